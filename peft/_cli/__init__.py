"""The pieces of the main job, `python -m peft` (see `peft/__main__.py`).

`parser` defines the commands and flags; `base` loads the base model and
the Shakespeare data; `adapt` builds the LoRA (or QLoRA) surgery from flags
and restores adapter files; `train` is `finetune`; `commands` holds
`eval`, `sample`, `merge` and `summary`; `demo` chains them; `interrupt`
makes Ctrl-C end the run with one line and status 130, outputs whole.
"""
