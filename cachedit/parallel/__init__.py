"""Parallel plans. Every collective goes through a backend's `Communicator`."""
