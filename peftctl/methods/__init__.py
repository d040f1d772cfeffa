"""PEFT methods: one module per method, each with its recipe section, its build step and what it can do.
`registry.METHODS` names them all."""
