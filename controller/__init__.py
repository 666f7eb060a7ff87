"""wakegate's control plane: configuration, the command line, and (later) service state."""

__version__ = "0.1.0"
