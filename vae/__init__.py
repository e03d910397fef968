"""The KL-regularised autoencoder of latent diffusion and its training losses."""
