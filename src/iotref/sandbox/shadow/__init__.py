"""AWS IoT's Device Shadow service in the sandbox: the component, its MQTT side and the
shadows' operations (:mod:`~iotref.sandbox.shadow.service`), the REST data plane
(:mod:`~iotref.sandbox.shadow.rest`, AWS Signature V4 in
:mod:`~iotref.sandbox.shadow.aws_sigv4`), the store and the per-thing request limits."""
