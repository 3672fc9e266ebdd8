"""The prepare stage: capture a model as a graph and run the prepare pipeline."""
