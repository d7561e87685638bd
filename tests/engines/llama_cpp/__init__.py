"""A stand-in for llama-cpp-python in the serving tests: put ``tests/engines`` on a server's PYTHONPATH."""
