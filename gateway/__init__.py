"""The Qantara process: settings, CLI, lifecycle of all listeners, HTTP app."""
