"""The maths of `stade finetune`: the loss (distillation, LM or a mix), the mask held exactly, masked LoRA.

Pure functions and modules: the training loop that uses them is `driver/finetune.py`.
"""
