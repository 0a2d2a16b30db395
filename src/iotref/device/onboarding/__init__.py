"""Onboarding a machine: the OAuth device flow and its tokens, the directory and
provisioning clients, the key and CSR, the certificate store and its checks, the platform
environments, and the next steps printed to the person."""
