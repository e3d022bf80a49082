"""CPU mla_decode (bf16, 576-wide latent, page 64, random page order) against torch's bmm form on
contiguous rows, at the short and long shapes of session 34's AMX work: minimum over three runs
of the median of 60 calls each, both timed in one process. For A/B of two builds, run it once per
build, alternating (session 36: bench/results/h100-2026-12-06-s36/cpu/mla_parts_ab.log):
    PYTHONPATH=python python bench/experiments/mla_cpu_short.py
"""
import torch, time, statistics, kvcore
torch.manual_seed(0)
kvcore.set_validation(False)
def bench(f, reps=60):
    for _ in range(5): f()
    ts=[]
    for _ in range(reps):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return statistics.median(ts)*1e3
for batch, heads, seq in ((1,128,256),(8,128,256),(1,128,4096),(4,16,4096)):
    pages=batch*seq//64
    ql=torch.randn(batch,heads,576).bfloat16()
    latent=torch.randn(pages,64,576).bfloat16()
    table=torch.randperm(pages).to(torch.int32).view(batch,seq//64)
    lens=torch.full((batch,),seq,dtype=torch.int32)
    out=torch.empty(batch,heads,512,dtype=torch.bfloat16)
    rows=latent[table.long()].reshape(batch,seq,576)
    def tf():
        w=torch.softmax(torch.bmm(ql,rows.transpose(1,2)).float()*576**-0.5,-1)
        return torch.bmm(w.bfloat16(),rows[...,:512])
    k=lambda: kvcore.mla_decode(ql,latent,table,lens,scale=576**-0.5,out=out)
    a=[];b=[]
    for r in range(3):
        a.append(bench(k)); b.append(bench(tf))
    print(f"B{batch} H{heads} S{seq}: kvcore {min(a):.3f} ms  torch {min(b):.3f} ms")
