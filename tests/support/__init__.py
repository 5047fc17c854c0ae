"""Helpers the tests share: launched instances, client addresses, sandboxes, clients."""
