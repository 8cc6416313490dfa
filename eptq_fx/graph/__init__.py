"""Graph-level code: capture (tracing), the op table, node.meta keys and the fx passes."""
