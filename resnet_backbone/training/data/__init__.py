"""Training data: the user's COCO and mask folders (read and checked before training), their image files,
augmentation that moves boxes and masks with the pixels, and synthetic shapes that need no download."""
