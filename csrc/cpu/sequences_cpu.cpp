// Ragged batches on the CPU: packed variable-length sequences and KV caches.
// Decode-shaped problems go to the streaming decode kernel, which walks every
// sequence's own rows (packed, cached or paged) in one parallel pass. The
// rest run the dense kernels one sequence at a time on views, so that each
// call still parallelizes over the sequence's heads and row blocks; a paged
// sequence is gathered first, which costs little next to a prefill's GEMMs.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cstring>

#include "cpu/attention_cpu.h"

namespace gqa::cpu {

namespace {

int64_t rows_per_kv_head(int64_t seqlen_q, const at::Tensor& q, const at::Tensor& k) {
  return seqlen_q * (q.size(q.dim() - 2) / k.size(k.dim() - 2));
}

}  // namespace

void attention_fwd_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttnParams& p,
                          const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                          at::Tensor& out, at::Tensor& lse) {
  const int32_t* cu_q = cu_seqlens_q.const_data_ptr<int32_t>();
  const int32_t* cu_k = cu_seqlens_k.const_data_ptr<int32_t>();
  const int64_t B = cu_seqlens_q.numel() - 1, Hq = q.size(1);
  if (decode_kernel_serves(q.scalar_type(), rows_per_kv_head(max_seqlen_q, q, k))) {
    SeqLayout seqs;
    seqs.cu_seqlens_q = cu_q;
    seqs.cu_seqlens_k = cu_k;
    seqs.batch = B;
    return attention_fwd_decode(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), p, seqs, max_seqlen_q, out, lse);
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t sq = cu_q[b + 1] - cu_q[b], sk = cu_k[b + 1] - cu_k[b];
    if (sq == 0) continue;
    at::Tensor out_b = out.narrow(0, cu_q[b], sq).unsqueeze(0);
    at::Tensor lse_b = at::empty({1, Hq, sq}, lse.options());
    attention_fwd(q.narrow(0, cu_q[b], sq).unsqueeze(0), k.narrow(0, cu_k[b], sk).unsqueeze(0),
                  v.narrow(0, cu_k[b], sk).unsqueeze(0), p, out_b, lse_b);
    lse.narrow(1, cu_q[b], sq).copy_(lse_b[0]);
  }
}

void attention_bwd_varlen(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& out, const at::Tensor& lse, const AttnParams& p,
                          const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, at::Tensor& dq,
                          at::Tensor& dk, at::Tensor& dv) {
  const int32_t* cu_q = cu_seqlens_q.const_data_ptr<int32_t>();
  const int32_t* cu_k = cu_seqlens_k.const_data_ptr<int32_t>();
  const int64_t B = cu_seqlens_q.numel() - 1;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t sq = cu_q[b + 1] - cu_q[b], sk = cu_k[b + 1] - cu_k[b];
    at::Tensor dq_b = dq.narrow(0, cu_q[b], sq).unsqueeze(0);
    at::Tensor dk_b = dk.narrow(0, cu_k[b], sk).unsqueeze(0);
    at::Tensor dv_b = dv.narrow(0, cu_k[b], sk).unsqueeze(0);
    if (sq == 0 || sk == 0) {  // no query sees a key: every gradient of the sequence is 0
      dq_b.zero_();
      dk_b.zero_();
      dv_b.zero_();
      continue;
    }
    const auto rows = [&](const at::Tensor& t) { return t.narrow(0, cu_q[b], sq).unsqueeze(0); };
    const auto keys = [&](const at::Tensor& t) { return t.narrow(0, cu_k[b], sk).unsqueeze(0); };
    attention_bwd(rows(dout), rows(q), keys(k), keys(v), rows(out), lse.narrow(1, cu_q[b], sq).unsqueeze(0), p, dq_b,
                  dk_b, dv_b);
  }
}

void kvcache_append(const KvCache& cache, const at::Tensor& k_new, const at::Tensor& v_new,
                    const at::Tensor& cache_seqlens) {
  const int64_t B = k_new.size(0), Sq = k_new.size(1), H = k_new.size(2);
  const int64_t row_bytes = k_new.size(3) * k_new.element_size();
  const int32_t* lens = cache_seqlens.const_data_ptr<int32_t>();
  const at::Tensor table = cache.block_table ? cache.block_table->contiguous() : at::Tensor();
  const int64_t block_size = cache.k.size(1);
  for (auto [src, dst] : {std::pair<const at::Tensor&, const at::Tensor&>{k_new, cache.k}, {v_new, cache.v}}) {
    const char* s = static_cast<const char*>(src.const_data_ptr());
    char* d = static_cast<char*>(dst.data_ptr());
    const int64_t es = src.element_size();
    at::parallel_for(0, B * Sq, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / Sq, i = t % Sq, pos = lens[b] + i;
        // The destination row: (b, pos) of a contiguous cache, or the block
        // holding pos and the row within it.
        int64_t blk = b, row = pos;
        if (cache.block_table) {
          blk = table.const_data_ptr<int32_t>()[b * table.size(1) + pos / block_size];
          row = pos % block_size;
        }
        for (int64_t h = 0; h < H; ++h) {
          std::memcpy(d + (blk * dst.stride(0) + row * dst.stride(1) + h * dst.stride(2)) * es,
                      s + (b * src.stride(0) + i * src.stride(1) + h * src.stride(2)) * es, row_bytes);
        }
      }
    });
  }
}

void attention_fwd_kvcache(const at::Tensor& q, const KvCache& cache, const at::Tensor& seqlens_k,
                           int64_t seqlens_add, const AttnParams& p, int64_t num_splits, at::Tensor& out,
                           at::Tensor& lse) {
  const int64_t B = q.size(0), Sq = q.size(1);
  const int32_t* lens = seqlens_k.const_data_ptr<int32_t>();
  const at::Tensor table = cache.block_table ? cache.block_table->contiguous() : at::Tensor();
  if (decode_kernel_serves(q.scalar_type(), rows_per_kv_head(Sq, q, cache.k))) {
    SeqLayout seqs;
    seqs.seqused_k = lens;
    seqs.seqused_k_add = seqlens_add;
    if (cache.block_table) {
      seqs.block_table = table.const_data_ptr<int32_t>();
      seqs.block_table_stride = table.size(1);
      seqs.block_size = cache.k.size(1);
    }
    seqs.batch = B;
    seqs.num_splits = num_splits;
    return attention_fwd_decode(q, cache.k, cache.v, p, seqs, Sq, out, lse);
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t sk = lens[b] + seqlens_add;
    at::Tensor k_b, v_b;
    if (cache.block_table) {
      const int64_t bs = cache.k.size(1), n_blocks = (sk + bs - 1) / bs;
      // The sequence's blocks, gathered into one contiguous (1, sk, Hkv, D).
      const at::Tensor idx = table[b].narrow(0, 0, n_blocks).to(at::kLong);
      const auto gather = [&](const at::Tensor& c) {
        return c.index_select(0, idx).reshape({1, n_blocks * bs, c.size(2), c.size(3)}).narrow(1, 0, sk);
      };
      k_b = gather(cache.k), v_b = gather(cache.v);
    } else {
      k_b = cache.k.narrow(0, b, 1).narrow(1, 0, sk);
      v_b = cache.v.narrow(0, b, 1).narrow(1, 0, sk);
    }
    at::Tensor out_b = out.narrow(0, b, 1), lse_b = lse.narrow(0, b, 1);
    attention_fwd(q.narrow(0, b, 1), k_b, v_b, p, out_b, lse_b);
  }
}

}  // namespace gqa::cpu
