"""Backends: what runs a program's generations. `RuntimeEndpoint` speaks SGLang's native HTTP API to
a server; `InProcessBackend` and `Runtime` drive an engine in this process."""
