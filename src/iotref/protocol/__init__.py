"""Protocol pieces shared by the device library and the sandbox: topics, environment
files, shadow document rules and message schemas. Nothing here does I/O on a network."""
