"""The public losses: ``vcrd_loss`` (logits), ``VCRDLoss`` (module), ``fused_linear_vcrd_loss`` and
``FusedLinearVCRDLoss`` (hidden states and LM heads in, full logits never stored)."""
