"""Pure tensor math used by the methods (no modules, no hooks)."""
