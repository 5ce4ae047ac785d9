"""Model-size configs (ml_collections); the stage is chosen after `:` on the command line."""
