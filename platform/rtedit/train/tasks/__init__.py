"""Training tasks over the shared job runtime: the toy teacher now; distillation, reward and DMD next."""
