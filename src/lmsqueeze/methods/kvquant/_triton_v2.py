"""Triton source of the v2 KVQuant decode kernel (imported lazily by decode_v2.py, which documents it)."""

import triton
import triton.language as tl

from lmsqueeze.methods.kvquant._triton_kernels import _nat8, _nat16


@triton.jit
def _asm_x16(sel7, selx, t0, t1, t2, t3):
    # 4 bits: sel7 = nibbles & 7, selx = per-byte choice between entries 0..7 and 8..15 -> 4 x (level + 1152)
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 a, b, t, lo, hi, m;
        mov.b32 m, 0x64646464;
        prmt.b32 a, $6, $7, $4;
        prmt.b32 b, $8, $9, $4;
        prmt.b32 t, a, b, $5;
        prmt.b32 lo, t, m, 0x5140;
        prmt.b32 hi, t, m, 0x7362;
        mov.b32 {$0, $1}, lo;
        mov.b32 {$2, $3}, hi;
        }""",
        constraints="=h,=h,=h,=h,r,r,r,r,r,r",
        args=[sel7, selx, t0, t1, t2, t3],
        dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)


@triton.jit
def _asm_x4(sel, t0, t1):
    # sel: low 16 bits = 4 nibble codes (< 8); t0, t1: the codebook's bytes (level + 128)
    # -> four fp16 values 1024 + byte = level + 1152 (exact integers)
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, lo, hi, m;
        mov.b32 m, 0x64646464;
        prmt.b32 t, $5, $6, $4;
        prmt.b32 lo, t, m, 0x5140;
        prmt.b32 hi, t, m, 0x7362;
        mov.b32 {$0, $1}, lo;
        mov.b32 {$2, $3}, hi;
        }""",
        constraints="=h,=h,=h,=h,r,r,r",
        args=[sel, t0, t1],
        dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)


@triton.jit
def _lut_x4(sel, XLUT):
    # reference path (interpreter): nibble codes -> XLUT[code] = level + 1152 (fp32, exact) as fp16
    a = tl.load(XLUT + (sel & 15)).to(tl.float16)
    b = tl.load(XLUT + ((sel >> 4) & 15)).to(tl.float16)
    c = tl.load(XLUT + ((sel >> 8) & 15)).to(tl.float16)
    d = tl.load(XLUT + ((sel >> 12) & 15)).to(tl.float16)
    return a, b, c, d


@triton.jit
def _x4(sel, t0, t1, XLUT, USE_ASM: tl.constexpr):
    if USE_ASM:
        a, b, c, d = _asm_x4(sel, sel * 0 + t0, sel * 0 + t1)
    else:
        a, b, c, d = _lut_x4(sel, XLUT)
    return a, b, c, d


@triton.jit
def _unpack_x(WP, row, t0, t1, t2, t3, XLUT, D: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """x = level + 1152 (fp16, exact) of all D channels of BLOCK_N token rows, natural channel order.

    WP: the (batch, head) base pointer of the packed words; row: [BN] int32 word offset of each token row.
    Returns [BN, D] fp16."""
    if BITS == 4:
        w = tl.arange(0, D // 8)
        wd = tl.load(WP + row[:, None] + w[None, :])
        if USE_ASM:
            s7 = wd & 0x77777777
            sx = ((wd >> 1) & 0x44444444) | 0x32103210
            z = wd * 0
            p0, p1, p2, p3 = _asm_x16(s7, sx, z + t0, z + t1, z + t2, z + t3)
            p4, p5, p6, p7 = _asm_x16(s7 >> 16, sx >> 16, z + t0, z + t1, z + t2, z + t3)
        else:
            p0, p1, p2, p3 = _lut_x4(wd, XLUT)
            p4, p5, p6, p7 = _lut_x4(wd >> 16, XLUT)
        out = _nat8(p0, p1, p2, p3, p4, p5, p6, p7)
    else:
        w = tl.arange(0, D // 16)
        wd = tl.load(WP + row[:, None] + w[None, :])
        lo = wd & 0x33333333
        hi = (wd >> 2) & 0x33333333
        if BITS == 3:
            hb = tl.load(WP + row[:, None] + D // 16 + (w // 2)[None, :]) >> (2 * (w % 2))[None, :]
            lo = lo | ((hb & 0x11111111) << 2)
            hi = hi | (((hb >> 1) & 0x11111111) << 2)
        p0, p1, p2, p3 = _x4(lo, t0, t1, XLUT, USE_ASM)
        p4, p5, p6, p7 = _x4(lo >> 16, t0, t1, XLUT, USE_ASM)
        p8, p9, p10, p11 = _x4(hi, t0, t1, XLUT, USE_ASM)
        p12, p13, p14, p15 = _x4(hi >> 16, t0, t1, XLUT, USE_ASM)
        out = _nat16(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15)
    return out


@triton.jit
def _sincos64(x, USE_ASM: tl.constexpr):
    """cos, sin of fp32 angles of any size: reduced modulo 2 pi in float64, then MUFU cos/sin.approx
    (absolute error ~1e-6 on [-pi, pi]) with inline assembly, libm otherwise."""
    xd = x.to(tl.float64)
    r = (xd - tl.floor(xd * 0.15915494309189535 + 0.5) * 6.283185307179586).to(tl.float32)
    if USE_ASM:
        c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32, is_pure=True, pack=1)
        s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32, is_pure=True, pack=1)
        return c, s
    else:
        return tl.cos(r), tl.sin(r)


@triton.jit
def _v2_split_kernel(
    Q, O_part, L_part,
    KC, VC, KO, VO, VS, VZ, POS, KIND, SK, SV, SSLOT,
    KSC, KCF, CRT, SRT, EYE, KXLUT, VXLUT, INV_FREQ, LENGTHS, STARTS, VSMAX,
    qk_scale, rope_scale, cap, Hkv, n_sink, fwin, mwin, num_splits,
    kt0, kt1, kt2, kt3, vt0, vt1, vt2, vt3,
    D: tl.constexpr, BITS: tl.constexpr, W: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, NOUT: tl.constexpr, NSIDE: tl.constexpr, NSIDE_P2: tl.constexpr,
    HAS_STARTS: tl.constexpr, USE_ASM: tl.constexpr, TAB_REGS: tl.constexpr, VOUT_EYE: tl.constexpr,
    KFOLD: tl.constexpr,
):
    HALF: tl.constexpr = D // 2
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    h = bh % Hkv
    L = tl.load(LENGTHS + b)
    lo = L * 0
    if HAS_STARTS:
        lo = tl.load(STARTS + b)
    if mwin > 0:
        lo = tl.maximum(lo, L - mwin)
    qhi = L - fwin
    lo_al = (lo // BLOCK_N) * BLOCK_N
    per = tl.cdiv(tl.cdiv(tl.maximum(qhi - lo_al, 0), num_splits), BLOCK_N) * BLOCK_N
    s_lo = lo_al + pid_s * per
    s_hi = tl.minimum(s_lo + per, qhi)

    tok0 = bh.to(tl.int64) * cap
    KCb = KC + tok0 * W
    VCb = VC + tok0 * W
    KOb = KO + tok0 * NOUT
    VOb = VO + tok0 * NOUT
    VSb = VS + tok0
    VZb = VZ + tok0
    KINDb = KIND + b.to(tl.int64) * cap
    POSb = POS + b.to(tl.int64) * cap

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    nn = tl.arange(0, BLOCK_N)
    gmask = g < G
    qrow = bh * G + g
    Qb = Q + qrow[:, None] * D
    Qb_t = Q + qrow[None, :] * D
    sig = tl.where(d < HALF, 1.0, -1.0)                       # [D]
    fidx = d % HALF
    pd = (d + HALF) % D                                       # each channel's RoPE partner
    qsc = qk_scale * rope_scale
    own = tl.load(Qb + d[None, :], mask=gmask[:, None], other=0.0).to(tl.float32) * qsc     # [BG, D]
    par = tl.load(Qb + pd[None, :], mask=gmask[:, None], other=0.0).to(tl.float32) * qsc
    S = tl.load(KSC + h * D + d)                              # [D] fp32: key = S * l'
    Ck = tl.load(KCF + h * D + d)                             # [D] fp16: l' = x / 128 + Ck
    inv = tl.load(INV_FREQ + fidx)
    ynorm = tl.maximum(tl.max(tl.sqrt(own * own + par * par) * tl.abs(S)[None, :], 1), 1e-30)   # [BG]
    Sn = S[None, :] / ynorm[:, None]
    # the query rotated back to the split's first position; each tile then steps by BLOCK_N positions
    p_first = tl.load(POSb + tl.minimum(s_lo, cap - 1)).to(tl.float32)
    c0, s0 = _sincos64(p_first * inv, False)
    # Ya = S * own~, Yb = sigma * S * partner~ (normalised); stepping a tile rotates (Ya, Yb) pairwise
    Ya = Sn * (own * c0[None, :] + sig[None, :] * par * s0[None, :])
    Yb = Sn * sig[None, :] * (par * c0[None, :] - sig[None, :] * own * s0[None, :])
    cB = tl.cos(inv * BLOCK_N)
    sB = tl.sin(inv * BLOCK_N)
    if TAB_REGS:
        CR = tl.load(CRT + nn[:, None] * D + d[None, :])
        SR = tl.load(SRT + nn[:, None] * D + d[None, :])

    m_i = tl.full((BLOCK_G,), -1.0e30, tl.float32)
    la = tl.zeros((BLOCK_N, BLOCK_G), tl.float32)   # sum of p, reduced after the loop
    za = tl.zeros((BLOCK_N, BLOCK_G), tl.float32)   # sum of p * value zero, reduced after the loop
    acc = tl.zeros((D, BLOCK_G), tl.float32)
    vmax = tl.maximum(tl.load(VSMAX + bh) * 128.0, 1e-30)
    for n0 in range(s_lo, s_hi, BLOCK_N):
        slots = n0 + nn
        row = slots * W
        if not TAB_REGS:
            CR = tl.load(CRT + nn[:, None] * D + d[None, :])
            SR = tl.load(SRT + nn[:, None] * D + d[None, :])
        # keys: l' = level / 128 + zero / scale, outliers folded in; key = S * l' (pre-RoPE)
        xk = _unpack_x(KCb, row, kt0, kt1, kt2, kt3, KXLUT, D, BITS, USE_ASM)
        lk = xk * 0.0078125 + Ck[None, :]
        if KFOLD:
            for j in tl.static_range(NOUT):
                ow = tl.load(KOb + slots * NOUT + j)
                oi = (ow >> 16) & 0xFFFF
                ov = (ow & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                so = tl.load(KSC + h * D + oi)
                lk = lk + tl.where(d[None, :] == oi[:, None], (ov / so)[:, None], 0.0).to(tl.float16)
        qk = tl.dot(lk * CR, tl.trans(Ya.to(tl.float16))) + tl.dot(lk * SR, tl.trans(Yb.to(tl.float16)))
        qk = qk * ynorm[None, :]
        if not KFOLD:
            # sparse key outliers: q . R(p) (residual e_c), from the unrotated query and the absolute angle
            for j in tl.static_range(NOUT):
                ow = tl.load(KOb + slots * NOUT + j)
                oi = (ow >> 16) & 0xFFFF
                ov = (ow & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                upper = oi >= HALF
                of = tl.where(upper, oi - HALF, oi)
                oc, osn = _sincos64((p_first + (slots - s_lo).to(tl.float32)) * tl.load(INV_FREQ + of), USE_ASM)
                qa = tl.load(Qb_t + oi[:, None], mask=gmask[None, :], other=0.0).to(tl.float32)
                qb = tl.load(Qb_t + tl.where(upper, of, oi + HALF)[:, None], mask=gmask[None, :], other=0.0)
                sgn = tl.where(upper, -osn, osn)
                qk += (qa * oc[:, None] + qb.to(tl.float32) * sgn[:, None]) * (ov * qsc)[:, None]
        kind = tl.load(KINDb + slots)
        ok = (slots >= lo) & (slots < s_hi) & (kind == 1)
        qk = tl.where(ok[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[None, :])
        la = la * alpha[None, :] + p

        # values: level / 128 on tensor cores with the per-token scale on p; zeros as p . z
        vs = tl.load(VSb + slots).to(tl.float32) * 128.0
        vz = tl.load(VZb + slots).to(tl.float32)
        xv = _unpack_x(VCb, row, vt0, vt1, vt2, vt3, VXLUT, D, BITS, USE_ASM)
        lv = xv * 0.0078125 - 9.0
        if not VOUT_EYE:
            vsafe = tl.where(vs > 0, vs, 1.0)
            for j in tl.static_range(NOUT):
                ow = tl.load(VOb + slots * NOUT + j)
                oi = (ow >> 16) & 0xFFFF
                ov = (ow & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                lv = lv + tl.where(d[None, :] == oi[:, None], (ov / vsafe)[:, None], 0.0).to(tl.float16)
        pv = (p * (vs / vmax)[:, None]).to(tl.float16)
        za = za * alpha[None, :] + p * vz[:, None]
        upd = tl.dot(tl.trans(lv), pv)
        if VOUT_EYE:  # one-hot rows gathered from an identity table, on tensor cores
            for j in tl.static_range(NOUT):
                ow = tl.load(VOb + slots * NOUT + j)
                oi = (ow >> 16) & 0xFFFF
                ov = (ow & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                ev = tl.load(EYE + oi[:, None] * D + d[None, :])
                upd += tl.dot(tl.trans(ev), (p * (ov / vmax)[:, None]).to(tl.float16))
        acc = acc * alpha[None, :] + upd * vmax
        m_i = m_new
        yn = Ya * cB[None, :] + Yb * sB[None, :]
        Yb = Yb * cB[None, :] - Ya * sB[None, :]
        Ya = yn
    l_i = tl.sum(la, 0)
    acc += tl.sum(za, 0)[None, :]
    if NSIDE > 0:  # noqa: SIM102 - a constexpr test around a runtime one
        if pid_s == 0:
            e = tl.arange(0, NSIDE_P2)
            em = e < NSIDE
            sl = tl.load(SSLOT + b * NSIDE + e, mask=em, other=-1)
            sok = (sl >= 0) & (sl >= lo) & (sl < L) & ((e < n_sink) | (sl >= L - fwin))
            srow = bh * NSIDE + e
            ks = tl.load(SK + srow[:, None] * D + d[None, :], mask=em[:, None], other=0.0).to(tl.float16)
            vv = tl.load(SV + srow[:, None] * D + d[None, :], mask=em[:, None], other=0.0).to(tl.float16)
            qf = tl.load(Qb + d[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
            qf = (qf * qk_scale).to(tl.float16)
            sq = tl.dot(ks, tl.trans(qf))
            sq = tl.where(sok[:, None], sq, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sq, 0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sq - m_new[None, :])
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha[None, :] + tl.dot(tl.trans(vv), p.to(tl.float16))
            m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[None, :]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    prow = qrow * num_splits + pid_s
    tl.store(O_part + prow[None, :] * D + d[:, None], out, mask=gmask[None, :])
    tl.store(L_part + prow, lse, mask=gmask)
