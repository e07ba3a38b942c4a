"""Fine-tuning on COCO-format data with Ray Train (the ``finetune`` job's machinery)."""
