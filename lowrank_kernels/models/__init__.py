"""Model-level helpers: adapters into any model by peft's target rules, peft adapter files in and out."""
