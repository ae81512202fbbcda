"""Agents assembled from aefrl's pieces. Each exposes the narrow interface the training loop
uses: ``act``, ``train_step``, ``report``, ``state_dict`` / ``load_state_dict``."""
