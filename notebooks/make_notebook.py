"""Writes path_sgd.ipynb from the cells below (run: python notebooks/make_notebook.py)."""

import pathlib
import re

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = pathlib.Path(__file__).parents[1]
#: The repository's address, from pyproject.toml's [project.urls] (the one place to change it).
REPOSITORY = re.search(
  r'^Repository = "(.+)"$', (ROOT / 'pyproject.toml').read_text(), re.MULTILINE
).group(1)

CELLS = [
  new_markdown_cell("""# Path-SGD in JAX with optax-path

[Path-SGD](https://arxiv.org/abs/1506.02617) (Neyshabur, Salakhutdinov & Srebro, NeurIPS 2015)
is steepest descent in a geometry that does not change when the units of a ReLU network are
rescaled. Each gradient is divided by its *path scale*, computed with one forward and one backward
pass of `|W|^p` over the layers. `optax_path.path_normalize` does this as an Optax gradient
transformation.

This notebook shows (1) the rescaling invariance on a tiny net, (2) a short training run on the
8x8 handwritten digits, with curves, and (3) how to use `path_normalize` in your own loop.
It runs on a CPU in about a minute."""),
  new_code_cell("""# On Colab: install optax-path (harmless where it is already installed).
try:
    import optax_path
except ImportError:
    %pip install -q "optax-path[experiments] @ git+""" + REPOSITORY + """"
    import optax_path"""),
  new_code_cell("""import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import optax_path

print('jax', jax.__version__, 'on', jax.devices()[0].platform)"""),
  new_markdown_cell("""## 1. Rescaling invariance on a tiny net

Multiply the incoming weights of a hidden unit by `c > 0` and divide its outgoing weights by `c`:
the network computes the same function. The paper's *unbalanced* initialisation does this to
random units with `c = 10 exp(z)`, `z ~ N(0, 1)` (as the authors' MATLAB code does it: factors of
about 1.4 to 74). How much that hurts SGD depends on the net and the run: on this small net,
over a few hundred steps, hardly (below, SGD's two curves stay close; in section 2, AdaGrad's
unbalanced run may even end lower than its balanced one); on the default experiment (2 x 512
units, 256 of them rescaled) SGD from the unbalanced start is stuck at 90% test error, and on
Fashion-MNIST (2 x 1000) it diverges in the first epoch in every seed (see the README's
Results). What holds on every net is that Path-SGD takes exactly the same steps from both starts (Theorem 4.1).
`optax_path.unbalance(..., scheme='stress')` draws `c = 10^exp(z)` instead, far harsher than the
paper (factors of 1e20 and beyond): section 2 adds it, and there SGD and AdaGrad fail while
Path-SGD, whose scales `path_normalize` computes in the log domain, does not notice."""),
  new_code_cell("""class MLP(nn.Module):
    hidden: tuple = (64, 64)
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, kernel_init=nn.initializers.variance_scaling(
                1.0, 'fan_in', 'normal'))(x))
        return nn.Dense(self.classes)(x)


digits = load_digits()
x_all = (digits.data / 16.0).astype(np.float32)
y_all = digits.target.astype(np.int32)
x_train, x_test, y_train, y_test = train_test_split(
    x_all, y_all, test_size=0.2, random_state=0, stratify=y_all)

model = MLP()
balanced = model.init(jax.random.key(0), x_train[:1])['params']
unbalanced = optax_path.unbalance(jax.random.key(1), balanced, num_units=32)
stressed = optax_path.unbalance(jax.random.key(1), balanced, num_units=32, scheme='stress')

outputs = lambda params: model.apply({'params': params}, x_test)
print('largest weight, balanced:  ', max(float(jnp.abs(w).max()) for w in jax.tree.leaves(balanced)))
print('largest weight, unbalanced:', max(float(jnp.abs(w).max()) for w in jax.tree.leaves(unbalanced)))
print('same function:', float(jnp.abs(outputs(balanced) - outputs(unbalanced)).max()))
print('path norm (invariant):', float(optax_path.path_norm(balanced)), float(optax_path.path_norm(unbalanced)))"""),
  new_code_cell("""def loss_fn(params, x, y):
    logits = model.apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def batches(steps, batch=100, seed=0):
    order = np.random.default_rng(seed).integers(0, len(x_train), size=(steps, batch))
    return jnp.asarray(x_train[order]), jnp.asarray(y_train[order])


def make_train(tx):
    \"\"\"A compiled run of tx over a stack of batches: (params, state, losses).\"\"\"

    @jax.jit
    def run(params, state, xs, ys):
        def step(carry, batch):
            params, state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (params, state), losses = jax.lax.scan(step, (params, state), (xs, ys))
        return params, state, losses

    return run


curves = {}
xs, ys = batches(200)
for name, tx in [('SGD', optax.sgd(0.1)), ('Path-SGD', optax_path.path_sgd(0.1))]:
    run = make_train(tx)
    for init, params in [('balanced', balanced), ('unbalanced', unbalanced)]:
        curves[name, init] = run(params, tx.init(params), xs, ys)

gap = float(jnp.abs(outputs(curves['Path-SGD', 'balanced'][0])
                    - outputs(curves['Path-SGD', 'unbalanced'][0])).max())
print('Path-SGD, balanced vs unbalanced start, largest output difference after 200 steps:', gap)

fig, ax = plt.subplots(figsize=(6, 3.5))
for (name, init), (_, _, losses) in curves.items():
    ax.plot(np.asarray(losses), label=f'{name}, {init}', ls='-' if init == 'balanced' else '--')
ax.set(yscale='log', xlabel='step', ylabel='training cross-entropy', ylim=(1e-2, 1e3))
ax.legend(); plt.show()"""),
  new_markdown_cell("""## 2. A short run on digits: Path-SGD vs SGD vs AdaGrad

Epochs of mini-batches of 100, from the balanced start, the paper's unbalanced one and the
stress one, with step sizes picked by hand (the full experiments, `python -m optax_path.experiments reproduce`, search them on a
validation split as the paper does, and cover more data sets)."""),
  new_code_cell("""def error(params, x, y):
    return float(jnp.mean(jnp.argmax(model.apply({'params': params}, x), -1) != y))


def train_epochs(tx, params, epochs=10, batch=100):
    run, state, history = make_train(tx), tx.init(params), []
    for epoch in range(epochs):
        params, state, losses = run(params, state, *batches(len(x_train) // batch, batch, epoch))
        history.append((float(losses.mean()), error(params, x_train, y_train),
                        error(params, x_test, y_test)))
    return np.array(history)


methods = {'Path-SGD': optax_path.path_sgd(0.1), 'SGD': optax.sgd(0.1),
           'AdaGrad': optax.adagrad(0.01)}
start = time.time()
results = {(name, init): train_epochs(tx, params)
           for name, tx in methods.items()
           for init, params in [('balanced', balanced), ('unbalanced', unbalanced),
                                ('stress', stressed)]}
print(f'{time.time() - start:.1f} s')

fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
titles = ['training cross-entropy', '0/1 training error', '0/1 test error']
for (name, init), history in results.items():
    for k, ax in enumerate(axes):
        ax.plot(np.arange(1, len(history) + 1), history[:, k], label=f'{name}, {init}',
                color={'Path-SGD': 'C3', 'SGD': 'C0', 'AdaGrad': 'C2'}[name],
                ls={'balanced': '-', 'unbalanced': '--', 'stress': ':'}[init])
for ax, title in zip(axes, titles):
    ax.set(title=title, xlabel='epoch', yscale='log' if ax is axes[0] else 'linear')
axes[2].set_ylim(0, 1); axes[0].legend(fontsize=7); plt.show()
for key, history in results.items():  # loss nan: the run diverged (then argmax picks class 0)
    print(f'{key[0]:>9} {key[1]:>10}: final training loss {history[-1, 0]:.3g}, '
          f'test error {history[-1, 2]:.3f}')"""),
  new_markdown_cell("""## 3. In your own training loop

`path_normalize` is an ordinary Optax gradient transformation. It needs `params` in `update`,
finds the dense layers of a Flax MLP by itself (`Dense_0`, `Dense_1`, ... or your own names;
pass `layers=[...]` to give the order), and chains with any optimizer. Its state keeps the path
scales per unit: each `update` warm-starts from the previous ones, which keeps a step within
about 15% of a plain SGD step on a CPU (see the README's Performance section)."""),
  new_code_cell("""tx = optax.chain(optax_path.path_normalize(p=2.0), optax.sgd(0.1, momentum=0.9))
opt_state = tx.init(balanced)


@jax.jit
def train_step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)   # params are required
    return optax.apply_updates(params, updates), opt_state


params = balanced
for i in range(0, 1000, 100):
    params, opt_state = train_step(params, opt_state, x_train[i:i + 100], y_train[i:i + 100])
print('test error after 10 steps:', error(params, x_test, y_test))

# Flax NNX: nnx.Optimizer(model, optax_path.path_sgd(0.1), wrt=nnx.Param).
# Any optimizer in the path geometry, rescaling invariant: optax_path.path_adam(1e-3),
# optax_path.path_geometry(optax.adagrad(0.01)).
# The path regulariser phi_p, differentiable: loss + lam * optax_path.path_norm(params) ** 2.
print('path scales of the first kernel:', optax_path.path_scales(params)['Dense_0']['kernel'].shape)"""),
]


def main():
  notebook = new_notebook(
    cells=CELLS,
    metadata={
      'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
      'language_info': {'name': 'python'},
      'colab': {'provenance': []},
    },
  )
  path = pathlib.Path(__file__).with_name('path_sgd.ipynb')
  nbformat.write(notebook, path)
  print('wrote', path)


if __name__ == '__main__':
  main()
