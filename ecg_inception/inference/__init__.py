"""The inference room: prediction, export and explanation (Grad-CAM, lead shares) of trained checkpoints."""
