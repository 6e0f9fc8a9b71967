"""qpeft's built-in backends. Each module is a plugin registered through the ``qpeft``
entry-point group, exactly like a third-party package; none imports another."""
