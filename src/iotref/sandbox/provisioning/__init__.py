"""Configuration and provisioning: the service that certifies device keys
(:mod:`~iotref.sandbox.provisioning.service`) and its bulk route for fleets
(:mod:`~iotref.sandbox.provisioning.bulk`), the sandbox's certificate authorities
(:mod:`~iotref.sandbox.provisioning.certificate_authority`) and the thing registry
(:mod:`~iotref.sandbox.provisioning.things`)."""
