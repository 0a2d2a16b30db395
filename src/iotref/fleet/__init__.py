"""The fleet simulator (``iotref fleet``) and the simulated press (``iotref run``, demos).

Not device code: a machine never runs it. It builds on :mod:`iotref.device` and
:mod:`iotref.protocol` (each simulated machine is a real library device) and speaks to the
sandbox only over HTTP and MQTT; :mod:`iotref.device` never imports it. How a run works and
what it measures: docs/fleet.md.
"""
