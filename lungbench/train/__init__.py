"""Layer 9 (train): training with the one step: config, engine, checkpoints, metrics, LR finder, TTA, CAM, transfer learning, weights, losses and costs.

What may live here: what trains, evaluates and explains a model with lungbench.step's
TrainStep. What may not: a second training step, a recipe (lungbench.experiments) or argparse.
"""
