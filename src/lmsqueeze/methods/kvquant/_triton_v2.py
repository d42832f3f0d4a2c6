"""Triton source of the v2 KVQuant decode kernel (imported lazily by decode_v2.py, which documents it)."""

import triton
import triton.language as tl

from lmsqueeze.methods.kvquant._triton_kernels import _nat4, _nat8, _opaque, _outlier


@triton.jit
def _asm_pairs4(sel, t0, t1):
    # sel: low 16 bits = 4 nibble codes (< 8); t0, t1: the codebook's bytes (level + 128)
    # -> two int32, each an fp16 pair (1024 + byte = level + 1152, exact) of codes (0, 1) and (2, 3)
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, m;
        mov.b32 m, 0x64646464;
        prmt.b32 t, $3, $4, $2;
        prmt.b32 $0, t, m, 0x5140;
        prmt.b32 $1, t, m, 0x7362;
        }""",
        constraints="=r,=r,r,r,r",
        args=[sel, t0, t1],
        dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _asm_pairs16(sel7, selx, t0, t1, t2, t3):
    # 4 bits: sel7 = nibbles & 7, selx = per-byte choice between entries 0..7 and 8..15 -> two fp16 pairs
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 a, b, t, m;
        mov.b32 m, 0x64646464;
        prmt.b32 a, $4, $5, $2;
        prmt.b32 b, $6, $7, $2;
        prmt.b32 t, a, b, $3;
        prmt.b32 $0, t, m, 0x5140;
        prmt.b32 $1, t, m, 0x7362;
        }""",
        constraints="=r,=r,r,r,r,r,r,r",
        args=[sel7, selx, t0, t1, t2, t3],
        dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _pack2(a, b):
    """fp16 a, b -> int32 with a in the low half, b in the high half."""
    return (a.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (b.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _lut_pairs(sel, XLUT):
    # reference path (interpreter): nibble codes -> XLUT[code] = level + 1152 as packed fp16 pairs
    a = tl.load(XLUT + (sel & 15)).to(tl.float16)
    b = tl.load(XLUT + ((sel >> 4) & 15)).to(tl.float16)
    c = tl.load(XLUT + ((sel >> 8) & 15)).to(tl.float16)
    d = tl.load(XLUT + ((sel >> 12) & 15)).to(tl.float16)
    return _pack2(a, b), _pack2(c, d)


@triton.jit
def _pairs(sel, t0, t1, XLUT, USE_ASM: tl.constexpr):
    if USE_ASM:
        a, b = _asm_pairs4(sel, sel * 0 + t0, sel * 0 + t1)
    else:
        a, b = _lut_pairs(sel, XLUT)
    return a, b


@triton.jit
def _unpack_pairs(WP, row, t0, t1, t2, t3, XLUT, D: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """x = level + 1152 (fp16, exact) of all D channels of BLOCK_N token rows as packed pairs.

    WP: the (batch, head) base pointer of the packed words; row: [BN] int32 word offset of each token row.
    Returns [BN, D // 2] int32: element j holds channels 2j (low half) and 2j + 1 (high half)."""
    if BITS == 4:
        w = tl.arange(0, D // 8)
        wd = tl.load(WP + row[:, None] + w[None, :])
        if USE_ASM:
            s7 = wd & 0x77777777
            sx = ((wd >> 1) & 0x44444444) | 0x32103210
            z = wd * 0
            p0, p1 = _asm_pairs16(s7, sx, z + t0, z + t1, z + t2, z + t3)
            p2, p3 = _asm_pairs16(s7 >> 16, sx >> 16, z + t0, z + t1, z + t2, z + t3)
        else:
            p0, p1 = _lut_pairs(wd, XLUT)
            p2, p3 = _lut_pairs(wd >> 16, XLUT)
        out = _nat4(p0, p1, p2, p3)
    else:
        w = tl.arange(0, D // 16)
        wd = tl.load(WP + row[:, None] + w[None, :])
        lo = wd & 0x33333333
        hi = (wd >> 2) & 0x33333333
        if BITS == 3:
            wh = tl.arange(0, D // 32)
            hw = tl.load(WP + row[:, None] + D // 16 + wh[None, :])         # [BN, D / 32] high-bit words
            hb = tl.reshape(tl.join(hw, hw), (row.shape[0], D // 16)) >> (2 * (w % 2))[None, :]
            lo = lo | ((hb & 0x11111111) << 2)
            hi = hi | (((hb >> 1) & 0x11111111) << 2)
        p0, p1 = _pairs(lo, t0, t1, XLUT, USE_ASM)
        p2, p3 = _pairs(lo >> 16, t0, t1, XLUT, USE_ASM)
        p4, p5 = _pairs(hi, t0, t1, XLUT, USE_ASM)
        p6, p7 = _pairs(hi >> 16, t0, t1, XLUT, USE_ASM)
        out = _nat8(p0, p1, p2, p3, p4, p5, p6, p7)
    return out


@triton.jit
def _spread(u, BN: tl.constexpr, D: tl.constexpr):
    """[BN, D/2] int32 pairs -> [BN, D] int32 where elements 2j and 2j + 1 both hold pair j (registers only)."""
    return tl.reshape(tl.join(u, u), (BN, D))


@triton.jit
def _half(u2, d):
    """Interpreter path: the fp16 of channel d held in its pair u2 (low half for even d)."""
    return ((u2 >> ((d % 2) * 16)[None, :]) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _keys_rot(u2, ck, cr, sr, d, USE_ASM: tl.constexpr):
    """l' = x / 128 + ck; returns (l' * cr, l' * sr) in fp16 (one f16x2 FMA and two multiplies per pair)."""
    if USE_ASM:
        x1, x2 = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 l, k;
            mov.b32 k, 0x20002000;
            fma.rn.f16x2 l, $2, k, $4;
            mul.rn.f16x2 $0, l, $5;
            mul.rn.f16x2 $1, l, $6;
            }""",
            constraints="=r,=r,r,r,r,r,r",
            args=[u2, ck, cr, sr],
            dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    else:
        lk = _half(u2, d) * 0.0078125 + ck
        x1 = lk * cr
        x2 = lk * sr
    return x1, x2


@triton.jit
def _values_lv(u2, d, USE_ASM: tl.constexpr):
    """level / 128 = x / 128 - 9 (exact) in fp16."""
    if USE_ASM:
        lv = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 k, c;
            mov.b32 k, 0x20002000;
            mov.b32 c, 0xC880C880;
            fma.rn.f16x2 $0, $1, k, c;
            }""",
            constraints="=r,r,r",
            args=[u2],
            dtype=tl.float16, is_pure=True, pack=2)
    else:
        lv = _half(u2, d) * 0.0078125 - 9.0
    return lv


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
def _pad_cols(x, BN: tl.constexpr, GP: tl.constexpr, LOG_STRIDE: tl.constexpr):
    """[BN, GP] -> [BN, GP << LOG_STRIDE] with column g moved to g << LOG_STRIDE, zeros elsewhere."""
    for i in tl.static_range(LOG_STRIDE):
        x = tl.reshape(tl.join(x, tl.zeros_like(x)), (BN, GP * (2 << i)))
    return x


@triton.jit
def _key_scores(KCb, KOb, KINDb, slots, toff, CRT, SRT, Ck2, Ya16, Yb16, ynorm, Qc, gcm, INV_FREQ, p_first, s_lo,
                lo, s_hi, qsc, kt0, kt1, kt2, kt3, KXLUT, d,
                D: tl.constexpr, BITS: tl.constexpr, W: tl.constexpr, NOUT: tl.constexpr, IMASK: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, GP: tl.constexpr, LOG_STRIDE: tl.constexpr,
                USE_ASM: tl.constexpr,
                OPAQUE: tl.constexpr):
    """Masked base-2 scores [BLOCK_N, BLOCK_G] of the tokens `slots` (table rows toff + n)."""
    HALF: tl.constexpr = D // 2
    nn = tl.arange(0, BLOCK_N)
    CR = tl.load(CRT + (toff + nn)[:, None] * D + d[None, :])
    SR = tl.load(SRT + (toff + nn)[:, None] * D + d[None, :])
    uk = _spread(_unpack_pairs(KCb, slots * W, kt0, kt1, kt2, kt3, KXLUT, D, BITS, USE_ASM), BLOCK_N, D)
    x1, x2 = _keys_rot(uk, Ck2, CR, SR, d, USE_ASM)
    if OPAQUE == 2:
        x1 = _opaque(x1, USE_ASM)
        x2 = _opaque(x2, USE_ASM)
    qk = tl.dot(x1, tl.trans(Ya16)) + tl.dot(x2, tl.trans(Yb16))
    dqs = tl.zeros((BLOCK_N, BLOCK_G), tl.float32)
    for w in tl.static_range(NOUT):
        ow = tl.load(KOb + slots * NOUT + w)  # one load, two entries
        for hi in tl.static_range(2):
            oi, ov = _outlier(ow, hi, IMASK)
            upper = oi >= HALF
            of = tl.where(upper, oi - HALF, oi)
            oc, osn = _sincos64((p_first + (slots - s_lo).to(tl.float32)) * tl.load(INV_FREQ + of), USE_ASM)
            qa = tl.load(Qc + oi[:, None], mask=gcm[None, :], other=0.0).to(tl.float32)
            qb = tl.load(Qc + tl.where(upper, of, oi + HALF)[:, None], mask=gcm[None, :], other=0.0).to(tl.float32)
            sgn = tl.where(upper, -osn, osn)
            dq = (qa * oc[:, None] + qb * sgn[:, None]) * (ov * qsc)[:, None]
            dqs += _pad_cols(dq, BLOCK_N, GP, LOG_STRIDE)
    kind = tl.load(KINDb + slots)
    ok = (slots >= lo) & (slots < s_hi) & (kind == 1)
    qk = qk * ynorm[None, :] + dqs
    return tl.where(ok[:, None], qk, float("-inf"))


@triton.jit
def _value_update(VCb, VOb, VSb, VZb, EYE, slots, p, vmax, vt0, vt1, vt2, vt3, VXLUT, d,
                  D: tl.constexpr, BITS: tl.constexpr, W: tl.constexpr, NOUT: tl.constexpr, IMASK: tl.constexpr,
                  BLOCK_N: tl.constexpr, USE_ASM: tl.constexpr, OPAQUE: tl.constexpr):
    """(p^T V / vmax [BLOCK_G, D], p * value zero [BLOCK_N, BLOCK_G]) of the tokens `slots`."""
    vs = tl.load(VSb + slots).to(tl.float32) * 128.0
    vz = tl.load(VZb + slots).to(tl.float32)
    uv = _spread(_unpack_pairs(VCb, slots * W, vt0, vt1, vt2, vt3, VXLUT, D, BITS, USE_ASM), BLOCK_N, D)
    lv = _values_lv(uv, d, USE_ASM)
    if OPAQUE == 2:
        lv = _opaque(lv, USE_ASM)
    pv = (p * (vs / vmax)[:, None]).to(tl.float16)
    if OPAQUE > 0:
        pv = _opaque(pv, USE_ASM)
    upd = tl.dot(tl.trans(pv), lv)
    for w in tl.static_range(NOUT):
        ow = tl.load(VOb + slots * NOUT + w)  # one load, two entries
        for hi in tl.static_range(2):
            oi, ov = _outlier(ow, hi, IMASK)
            ev = tl.load(EYE + oi[:, None] * D + d[None, :])
            pe = (p * (ov / vmax)[:, None]).to(tl.float16)
            if OPAQUE > 0:
                pe = _opaque(pe, USE_ASM)
            upd += tl.dot(tl.trans(pe), ev)
    return upd, p * vz[:, None]


@triton.jit
def _v2_split_kernel(
    Q, O_part, L_part,
    KC, VC, KO, VO, VS, VZ, POS, KIND, SK, SV, SSLOT,
    KSC, KCF, CRT, SRT, EYE, KXLUT, VXLUT, INV_FREQ, LENGTHS, STARTS, VSMAX,
    qk_scale, rope_scale, cap, Hkv, n_sink, fwin, mwin, num_splits,
    kt0, kt1, kt2, kt3, vt0, vt1, vt2, vt3,
    D: tl.constexpr, BITS: tl.constexpr, W: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    BLOCK_G: tl.constexpr, LOG_STRIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, NOUT: tl.constexpr, IMASK: tl.constexpr, NSIDE: tl.constexpr, NSIDE_P2: tl.constexpr,
    HAS_STARTS: tl.constexpr, USE_ASM: tl.constexpr, TAB_REGS: tl.constexpr, QROWS: tl.constexpr,
    OPAQUE: tl.constexpr = 0, NSUB: tl.constexpr = 1,
):
    HALF: tl.constexpr = D // 2
    STRIDE: tl.constexpr = 1 << LOG_STRIDE
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
    UNIT: tl.constexpr = BLOCK_N * NSUB
    lo_al = (lo // UNIT) * UNIT
    per = tl.cdiv(tl.cdiv(tl.maximum(qhi - lo_al, 0), num_splits), UNIT) * UNIT
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

    # query rows: row r of the [BLOCK_G, .] tiles is query head r / STRIDE of this KV head (r % STRIDE == 0)
    r = tl.arange(0, BLOCK_G)
    gq = r // STRIDE
    rmask = (r % STRIDE == 0) & (gq < G)
    qrow = bh * G + gq
    d = tl.arange(0, D)
    nn = tl.arange(0, BLOCK_N)
    Qb = Q + qrow[:, None] * D
    sig = tl.where(d < HALF, 1.0, -1.0)                       # [D]
    pd = (d + HALF) % D                                       # each channel's RoPE partner
    qsc = qk_scale * rope_scale
    own = tl.load(Qb + d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32) * qsc     # [BG, D]
    par = tl.load(Qb + pd[None, :], mask=rmask[:, None], other=0.0).to(tl.float32) * qsc
    S = tl.load(KSC + h * D + d)                              # [D] fp32: key = S * l'
    Ck = tl.load(KCF + h * D + d)                             # [D] fp16: l' = x / 128 + Ck
    inv = tl.load(INV_FREQ + d % HALF)
    ynorm = tl.maximum(tl.max(tl.sqrt(own * own + par * par) * tl.abs(S)[None, :], 1), 1e-30)   # [BG]
    Sn = S[None, :] / ynorm[:, None]
    # Ya = S * own~, Yb = sigma * S * partner~ (normalised), q~ = the query rotated back to the tile's first
    # position; stepping a tile rotates each (Ya, Yb) pair by BLOCK_N positions
    p_first = tl.load(POSb + tl.minimum(s_lo, cap - 1)).to(tl.float32)
    c0, s0 = _sincos64(p_first * inv, False)
    Ya = Sn * (own * c0[None, :] + sig[None, :] * par * s0[None, :])
    Yb = Sn * sig[None, :] * (par * c0[None, :] - sig[None, :] * own * s0[None, :])
    cB = tl.cos(inv * UNIT)
    sB = tl.sin(inv * UNIT)
    Ck2 = Ck[None, :] + tl.zeros((BLOCK_N, D), tl.float16)
    if TAB_REGS:
        CR = tl.load(CRT + nn[:, None] * D + d[None, :])
        SR = tl.load(SRT + nn[:, None] * D + d[None, :])
    # key outliers: [BLOCK_N, GP] math on the real query heads only
    gc = tl.arange(0, GP)
    gcm = gc < G
    Qc = Q + (bh * G + gc)[None, :] * D

    m_i = tl.full((BLOCK_G,), -1.0e30, tl.float32)
    if QROWS:  # scores [BLOCK_G, BLOCK_N]: the query side is the MMA's M operand (mma.sync)
        la = tl.zeros((BLOCK_G, BLOCK_N), tl.float32)   # sum of p, reduced after the loop
        za = tl.zeros((BLOCK_G, BLOCK_N), tl.float32)   # sum of p * value zero, reduced after the loop
    else:      # scores [BLOCK_N, BLOCK_G]: keys are the MMA's M operand
        la = tl.zeros((BLOCK_N, BLOCK_G), tl.float32)
        za = tl.zeros((BLOCK_N, BLOCK_G), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
    vmax = tl.maximum(tl.load(VSMAX + bh) * 128.0, 1e-30)
    if not QROWS:
        for n0 in range(s_lo, s_hi, UNIT):
            Ya16 = Ya.to(tl.float16)
            Yb16 = Yb.to(tl.float16)
            slots = n0 + nn
            qa = _key_scores(KCb, KOb, KINDb, slots, 0, CRT, SRT, Ck2, Ya16, Yb16, ynorm, Qc, gcm, INV_FREQ,
                             p_first, s_lo, lo, s_hi, qsc, kt0, kt1, kt2, kt3, KXLUT, d,
                             D, BITS, W, NOUT, IMASK, BLOCK_N, BLOCK_G, GP, LOG_STRIDE, USE_ASM, OPAQUE)
            if NSUB == 2:
                qb = _key_scores(KCb, KOb, KINDb, slots + BLOCK_N, BLOCK_N, CRT, SRT, Ck2, Ya16, Yb16, ynorm, Qc,
                                 gcm, INV_FREQ, p_first, s_lo, lo, s_hi, qsc, kt0, kt1, kt2, kt3, KXLUT, d,
                                 D, BITS, W, NOUT, IMASK, BLOCK_N, BLOCK_G, GP, LOG_STRIDE, USE_ASM, OPAQUE)
                m_new = tl.maximum(m_i, tl.max(tl.maximum(qa, qb), 0))
            else:
                m_new = tl.maximum(m_i, tl.max(qa, 0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qa - m_new[None, :])
            upd, zc = _value_update(VCb, VOb, VSb, VZb, EYE, slots, p, vmax, vt0, vt1, vt2, vt3, VXLUT, d,
                                    D, BITS, W, NOUT, IMASK, BLOCK_N, USE_ASM, OPAQUE)
            la = la * alpha[None, :] + p
            za = za * alpha[None, :] + zc
            if NSUB == 2:
                p2 = tl.exp2(qb - m_new[None, :])
                upd2, zc2 = _value_update(VCb, VOb, VSb, VZb, EYE, slots + BLOCK_N, p2, vmax, vt0, vt1, vt2, vt3,
                                          VXLUT, d, D, BITS, W, NOUT, IMASK, BLOCK_N, USE_ASM, OPAQUE)
                upd += upd2
                la += p2
                za += zc2
            acc = acc * alpha[:, None] + upd * vmax
            m_i = m_new
            yn = Ya * cB[None, :] + Yb * sB[None, :]
            Yb = Yb * cB[None, :] - Ya * sB[None, :]
            Ya = yn
    else:  # QROWS: one tile per step
        for n0 in range(s_lo, s_hi, BLOCK_N):
            slots = n0 + nn
            row = slots * W
            if not TAB_REGS:
                CR = tl.load(CRT + nn[:, None] * D + d[None, :])
                SR = tl.load(SRT + nn[:, None] * D + d[None, :])
            # keys: l' = level / 128 + zero / scale (key = S * l', pre-RoPE), times the relative RoPE tables
            uk = _spread(_unpack_pairs(KCb, row, kt0, kt1, kt2, kt3, KXLUT, D, BITS, USE_ASM), BLOCK_N, D)
            x1, x2 = _keys_rot(uk, Ck2, CR, SR, d, USE_ASM)
            if OPAQUE == 2:
                x1 = _opaque(x1, USE_ASM)
                x2 = _opaque(x2, USE_ASM)
            if QROWS:
                qk = tl.dot(Ya.to(tl.float16), tl.trans(x1)) + tl.dot(Yb.to(tl.float16), tl.trans(x2))
            else:
                qk = tl.dot(x1, tl.trans(Ya.to(tl.float16))) + tl.dot(x2, tl.trans(Yb.to(tl.float16)))
            # sparse key outliers: q . R(p) (residual e_c), from the unrotated query and the absolute angle
            dqs = tl.zeros((BLOCK_N, BLOCK_G), tl.float32)
            for w in tl.static_range(NOUT):
                ow = tl.load(KOb + slots * NOUT + w)  # one load, two entries
                for hi in tl.static_range(2):
                    oi, ov = _outlier(ow, hi, IMASK)
                    upper = oi >= HALF
                    of = tl.where(upper, oi - HALF, oi)
                    oc, osn = _sincos64((p_first + (slots - s_lo).to(tl.float32)) * tl.load(INV_FREQ + of), USE_ASM)
                    qa = tl.load(Qc + oi[:, None], mask=gcm[None, :], other=0.0).to(tl.float32)
                    qb = tl.load(Qc + tl.where(upper, of, oi + HALF)[:, None], mask=gcm[None, :],
                                 other=0.0).to(tl.float32)
                    sgn = tl.where(upper, -osn, osn)
                    dq = (qa * oc[:, None] + qb * sgn[:, None]) * (ov * qsc)[:, None]
                    dqs += _pad_cols(dq, BLOCK_N, GP, LOG_STRIDE)
            kind = tl.load(KINDb + slots)
            ok = (slots >= lo) & (slots < s_hi) & (kind == 1)
            vs = tl.load(VSb + slots).to(tl.float32) * 128.0
            vz = tl.load(VZb + slots).to(tl.float32)
            uv = _spread(_unpack_pairs(VCb, row, vt0, vt1, vt2, vt3, VXLUT, D, BITS, USE_ASM), BLOCK_N, D)
            lv = _values_lv(uv, d, USE_ASM)
            if OPAQUE == 2:
                lv = _opaque(lv, USE_ASM)
            if QROWS:
                qk = qk * ynorm[:, None] + tl.trans(dqs)
                qk = tl.where(ok[None, :], qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(qk - m_new[:, None])
                la = la * alpha[:, None] + p
                # values: level / 128 on tensor cores with the per-token scale on p; zeros as p . z
                za = za * alpha[:, None] + p * vz[None, :]
                upd = tl.dot((p * (vs / vmax)[None, :]).to(tl.float16), lv)
            else:
                qk = qk * ynorm[None, :] + dqs
                qk = tl.where(ok[:, None], qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 0))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(qk - m_new[None, :])
                la = la * alpha[None, :] + p
                za = za * alpha[None, :] + p * vz[:, None]
                pv = (p * (vs / vmax)[:, None]).to(tl.float16)
                if OPAQUE:
                    pv = _opaque(pv, USE_ASM)
                upd = tl.dot(tl.trans(pv), lv)
            # sparse value outliers through identity rows (one-hot, gathered) on tensor cores
            for w in tl.static_range(NOUT):
                ow = tl.load(VOb + slots * NOUT + w)  # one load, two entries
                for hi in tl.static_range(2):
                    oi, ov = _outlier(ow, hi, IMASK)
                    ev = tl.load(EYE + oi[:, None] * D + d[None, :])
                    if QROWS:
                        upd += tl.dot((p * (ov / vmax)[None, :]).to(tl.float16), ev)
                    else:
                        pe = (p * (ov / vmax)[:, None]).to(tl.float16)
                        if OPAQUE:
                            pe = _opaque(pe, USE_ASM)
                        upd += tl.dot(tl.trans(pe), ev)
            acc = acc * alpha[:, None] + upd * vmax
            m_i = m_new
            yn = Ya * cB[None, :] + Yb * sB[None, :]
            Yb = Yb * cB[None, :] - Ya * sB[None, :]
            Ya = yn
    if QROWS:
        l_i = tl.sum(la, 1)
        acc += tl.sum(za, 1)[:, None]
    else:
        l_i = tl.sum(la, 0)
        acc += tl.sum(za, 0)[:, None]
    if NSIDE > 0:  # noqa: SIM102 - a constexpr test around a runtime one
        if pid_s == 0:
            e = tl.arange(0, NSIDE_P2)
            em = e < NSIDE
            sl = tl.load(SSLOT + b * NSIDE + e, mask=em, other=-1)
            sok = (sl >= 0) & (sl >= lo) & (sl < L) & ((e < n_sink) | (sl >= L - fwin))
            srow = bh * NSIDE + e
            ks = tl.load(SK + srow[:, None] * D + d[None, :], mask=em[:, None], other=0.0).to(tl.float16)
            vv = tl.load(SV + srow[:, None] * D + d[None, :], mask=em[:, None], other=0.0).to(tl.float16)
            qf = tl.load(Qb + d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
            qf = (qf * qk_scale).to(tl.float16)
            sq = tl.dot(ks, tl.trans(qf))
            sq = tl.where(sok[:, None], sq, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sq, 0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sq - m_new[None, :])
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha[:, None] + tl.dot(tl.trans(p.to(tl.float16)), vv)
            m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    prow = qrow * num_splits + pid_s
    tl.store(O_part + prow[:, None] * D + d[None, :], out, mask=rmask[:, None])
    tl.store(L_part + prow, lse, mask=rmask)
