"""Layer 9 (train): training with the one step: config, engine, checkpoints, metrics, LR finder, TTA, CAM, transfer learning, weights, losses and costs."""
