"""Networks and their arithmetic: the Wide ResNet, SSL ops, cross-replica maths."""
