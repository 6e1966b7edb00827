// The message tags of the backend's own point-to-point messages on the inner groups: every family
// (user send/recv, the two data phases of the pipelined all-reduce, the call headers) in a range
// of its own, checked at compile time.
#pragma once

#include <cstdint>
#include <limits>

namespace localsgd {

constexpr int kHeaderTag = 0x50000000;        // + (seq mod 2^24); above both phases' ranges
constexpr int64_t kHeaderSeqMask = 0xFFFFFF;

// Tags sit in a range of their own per phase, far above what user send/recv use (those pass
// through with the user's tags and are refused from kPhaseTag[0] up): piece j of call c has
// base + (c mod 256) * 2^19 + 2j for the payload, + 1 for the scales. The FIFO worker waits for
// every message of a call before the next call starts, and a failed call fails the group, so
// tags never pair messages of two calls; the call bits make that hold even for a message that
// arrives late from a call that failed half way on another rank. Message lengths follow from
// the call header every rank agreed on before (check_call), so a message is never shorter or
// longer than the receive posted for it.
constexpr int kPhaseTag[2] = {0x40000000, 0x48000000};
constexpr int kCallTagShift = 19;
constexpr int64_t kCallTagMask = 0xFF;
constexpr int64_t kMaxPieces = int64_t{1} << (kCallTagShift - 1);
inline int phase_tag(int phase, uint64_t call_id, int64_t j, int m) {
  return kPhaseTag[phase] + static_cast<int>((call_id & kCallTagMask) << kCallTagShift) + static_cast<int>(2 * j + m);
}
// Every tag family has a range of its own: user tags below phase A, phase A below phase B, phase
// B below the call headers, the headers below INT_MAX. (The headers once sat inside phase B's
// range: after about 500K collectives a piece of call 224-255 mod 256 could match a pre-posted
// header receive.)
constexpr int64_t kPhaseTagSpan = (kCallTagMask << kCallTagShift) + 2 * kMaxPieces;  // tags per phase
static_assert(kPhaseTag[0] + kPhaseTagSpan <= kPhaseTag[1], "phase A's tags overlap phase B's");
static_assert(kPhaseTag[1] + kPhaseTagSpan <= kHeaderTag, "phase B's tags overlap the call headers'");
static_assert(int64_t{kHeaderTag} + kHeaderSeqMask <= int64_t{std::numeric_limits<int>::max()},
              "the call headers' tags overflow int");
static_assert(2 * kMaxPieces <= (int64_t{1} << kCallTagShift), "a call's pieces overlap the next call's tags");

}  // namespace localsgd
