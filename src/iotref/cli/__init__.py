"""The ``iotref`` command line."""
