"""Why 'shift' loses at small K on XLA:CPU: its kernel gradient, timed alone, whole-array vs cache-sized chunks.

    python experiments/dwconv_kgrad_probe.py 8 56 96 3      # N H C K

dk[u, v, c] = sum_{n,i,j} x_pad[n, i+u, j+v, c] * dy[n, i, j, c] computed (A) as 'shift' does, one reduction per
tap over the whole arrays (k^2 passes through memory), and (n{b}r{r}) in a fori_loop over chunks of b images x r
rows (the chunk stays in cache across the k^2 taps). Also the forward pass of 'shift' (k^2 fused multiply-adds,
one pass) for scale. Prints (wall ms, process CPU ms), best of 5: CPU time is the figure to compare on a shared
machine (wall time there mostly measures the other processes).
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from repjax.nn.dwconv import depthwise_conv

N, H, C, K = (int(v) for v in sys.argv[1:5]) if len(sys.argv) == 5 else (8, 56, 96, 3)
P = K // 2


def timed(f, *a, r=5):
    jax.block_until_ready(f(*a))
    ts, cs = [], []
    for _ in range(r):
        s, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(f(*a))
        ts.append(time.perf_counter() - s)
        cs.append(time.process_time() - c)
    return round(min(ts) * 1e3, 1), round(min(cs) * 1e3, 1)


def whole(x, dy):
    xp = jnp.pad(x, ((0, 0), (P, P), (P, P), (0, 0)))
    return jnp.stack([jnp.stack([jnp.sum(xp[:, u:u + H, v:v + H, :] * dy, axis=(0, 1, 2)) for v in range(K)])
                      for u in range(K)])


def chunked(x, dy, nb, rows):
    xp = jnp.pad(x, ((0, 0), (P, P), (P, P), (0, 0)))
    nr = H // rows

    def body(it, acc):
        b, i = (it // nr) * nb, (it % nr) * rows
        xr = jax.lax.dynamic_slice(xp, (b, i, 0, 0), (nb, rows + 2 * P, H + 2 * P, C))
        dr = jax.lax.dynamic_slice(dy, (b, i, 0, 0), (nb, rows, H, C))
        taps = [jnp.sum(xr[:, u:u + rows, v:v + H, :] * dr, axis=(0, 1, 2)) for u in range(K) for v in range(K)]
        return acc + jnp.stack(taps).reshape(K, K, C)

    return jax.lax.fori_loop(0, (N // nb) * nr, body, jnp.zeros((K, K, C)))


def main():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((N, H, H, C)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((N, H, H, C)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((K, K, 1, C)), jnp.float32)
    ref = np.asarray(jax.jit(whole)(x, dy))
    res = {"A whole": timed(jax.jit(whole), x, dy)}
    for nb, rows in [(N, 8), (1, H), (1, 8), (1, 4), (2, 4), (1, 2)]:
        if H % rows or N % nb:
            continue
        f = jax.jit(lambda a, b, nb=nb, rows=rows: chunked(a, b, nb, rows))
        np.testing.assert_allclose(np.asarray(f(x, dy)), ref, rtol=1e-4, atol=1e-2)
        res[f"n{nb}r{rows}"] = timed(f, x, dy)
    res["shift forward"] = timed(jax.jit(lambda a, b: depthwise_conv(a, b, "shift")), x, w)
    print("(wall ms, cpu ms)", (N, H, C, K), res)


if __name__ == "__main__":
    main()
