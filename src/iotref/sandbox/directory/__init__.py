"""The local stand-in for the Zaikio directory: the component
(:mod:`~iotref.sandbox.directory.service`), its records and seed data, the OAuth device flow,
the verification page and the ``/api/v1`` API."""
