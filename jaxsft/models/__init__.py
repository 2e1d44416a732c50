"""Model code: the NNX decoder, attention dispatch, Hugging Face conversion."""
