"""The gateway: rekey core, peer protocol, scheduler, configuration, CLI and daemon."""

__version__ = "0.1.0"
