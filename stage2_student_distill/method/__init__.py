"""The ICD method as pure torch: tokens, instance queries, the decoder, the losses and the module that holds them."""
