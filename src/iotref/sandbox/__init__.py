"""The local platform: directory, configuration and provisioning, CAs, Mosquitto as the
broker, the shadow service and the monitor, all on 127.0.0.1.

Installed with the ``iotref[sandbox]`` extra. Device code never imports this package.
"""
