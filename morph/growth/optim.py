def carry_optimizer_state(*a, **k): raise NotImplementedError
