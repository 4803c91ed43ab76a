"""Data: dataset names and files, TFRecords, image files, augmentations, the tf.data streams and Extend's reader."""
