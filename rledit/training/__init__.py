"""Lightning training of editors: the RLEdit rollout and the module that orchestrates it."""
