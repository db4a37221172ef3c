"""FLOPs accounting: the training and inference FLOPs sparse-training results are reported in."""
