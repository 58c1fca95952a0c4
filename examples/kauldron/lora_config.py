r"""LoRA fine-tuning of the reference decoder with kauldron.

Trains rank-4 LoRA adapters on the attention and MLP einsums of the tiny
reference decoder (`peft.models.tiny_config()`), predicting Shakespeare's
text byte by byte. Three pieces make it LoRA:

* `model`: `peft.LoRA(model=..., rank=...)` adds adapters to the selected
  layers without editing the model; params keep their paths and each adapter
  sits beside its kernel.
* `init_transform`: `kd_peft.SkipAdapters(wrapped=kd_peft.LoadHFCheckpoint(
  path=...))` restores the base (non-LoRA) checkpoint and keeps the fresh
  adapters.
* `optimizer`: `kd.optim.partial_updates(..., mask=peft.adapter_mask)`
  trains only the adapters; the base params get no update and no optimizer
  state.

Write a base checkpoint, then train (from the repository root):

```sh
python -c "from examples.kauldron import kd_peft; \
kd_peft.write_base_checkpoint('/tmp/peft_kd/base')"
python -m kauldron.main --cfg=examples/kauldron/lora_config.py \
    --cfg.workdir=/tmp/peft_kd/workdir
```
"""

from kauldron import konfig

# pylint: disable=g-import-not-at-top
with konfig.imports():
  from kauldron import kd
  import optax

  from examples.kauldron import kd_peft
  import peft
  from peft import models
# pylint: enable=g-import-not-at-top


def get_config():
  """The trainer: tiny decoder + LoRA, base restored, adapters trained."""
  return kd.train.Trainer(
      seed=0,
      train_ds=kd.data.py.DataSource(
          data_source=kd_peft.TokenWindows(
              windows=kd_peft.shakespeare_bytes(length=65),
          ),
          shuffle=True,
          batch_size=16,
          num_workers=0,
      ),
      model=peft.LoRA(
          model=kd_peft.LanguageModel(
              config=models.tiny_config(),
              tokens='batch.input',
          ),
          rank=4,
          # Regexes full-match module paths such as 'layers_0/attn/q_einsum'.
          targets=(r'.*/attn/.*', r'.*/mlp'),
      ),
      # The base checkpoint has no adapters: restore it around them.
      init_transform=kd_peft.SkipAdapters(
          wrapped=kd_peft.LoadHFCheckpoint(path='/tmp/peft_kd/base'),
      ),
      num_train_steps=300,
      train_losses={
          'xentropy': kd.losses.SoftmaxCrossEntropyWithIntLabels(
              logits='preds',
              labels='batch.target',
          ),
      },
      optimizer=kd.optim.partial_updates(
          optax.adam(learning_rate=1e-2),
          # Only the adapters train: params under 'lora' / 'lora_*' keys.
          mask=peft.adapter_mask,
      ),
      checkpointer=kd.ckpts.Checkpointer(save_interval_steps=100),
      log_metrics_every=50,
  )
