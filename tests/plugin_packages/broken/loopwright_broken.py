"""A plugin that cannot be imported, as one with a missing dependency or a syntax error."""

raise RuntimeError("the broken plugin fails on purpose")
