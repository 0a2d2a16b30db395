"""The device's side of the Device Shadow service (contract section 7): requests correlated
with their answers (:mod:`~iotref.device.shadow.requests`), local state kept in step with the
shadow (:mod:`~iotref.device.shadow.sync`), the application's say on desired changes
(:mod:`~iotref.device.shadow.desired`) and the shadow errors
(:mod:`~iotref.device.shadow.errors`). The document rules come from
:mod:`iotref.protocol.shadow_document`."""
