// Package jsontext holds the walks over JSON text that caddy-batch makes
// before, or instead of, decoding it: checks that bound what a recursive
// validator may be asked to do, and the one JSON string writer every
// answer goes through. None of them recurses.
package jsontext

import (
	"fmt"
	"unicode/utf8"

	"github.com/tidwall/gjson"
)

// Check returns what keeps b from being one valid JSON value in UTF-8
// nested at most maxDepth levels, as a phrase that follows its subject
// ("is not valid JSON"), and "" when nothing does; then commas counts the
// commas that separate the elements of a top-level array. The depth is
// checked before gjson's validator runs, as that one recurses.
func Check(b []byte, maxDepth int) (problem string, commas int) {
	if !utf8.Valid(b) {
		return "is not valid UTF-8", 0
	}
	depth, deepest := 0, 0
	EachStructural(b, func(_ int, c byte) {
		switch c {
		case '{', '[':
			depth++
			deepest = max(deepest, depth)
		case '}', ']':
			depth--
		case ',':
			if depth == 1 {
				commas++
			}
		}
	})
	if deepest > maxDepth {
		return fmt.Sprintf("nests JSON deeper than %d levels", maxDepth), 0
	}
	if !gjson.ValidBytes(b) {
		return "is not valid JSON", 0
	}
	return "", commas
}

// EachStructural calls fn with each of the bytes {}[], of b that stand
// outside JSON strings, and their offsets.
func EachStructural(b []byte, fn func(i int, c byte)) {
	inString := false
	for i := 0; i < len(b); i++ {
		c := b[i]
		if inString {
			switch c {
			case '\\':
				i++
			case '"':
				inString = false
			}
			continue
		}
		switch c {
		case '"':
			inString = true
		case '{', '[', '}', ']', ',':
			fn(i, c)
		}
	}
}

// Count counts the elements of a JSON array without decoding them.
func Count(arr gjson.Result) int {
	n := 0
	arr.ForEach(func(_, _ gjson.Result) bool {
		n++
		return true
	})
	return n
}

// Valid reports whether b is one JSON value in UTF-8 nested at most
// depth levels.
func Valid(b []byte, depth int) bool {
	return DepthWithin(b, depth) && utf8.Valid(b) && gjson.ValidBytes(b)
}

// DepthWithin reports whether the arrays and objects of b, outside its
// strings, nest at most limit levels. Unbalanced input is left to the
// validator: only the depth it would reach matters here.
func DepthWithin(b []byte, limit int) bool {
	depth := 0
	for i := 0; i < len(b); i++ {
		switch b[i] {
		case '"':
			for i++; i < len(b) && b[i] != '"'; i++ {
				if b[i] == '\\' {
					i++
				}
			}
		case '{', '[':
			if depth++; depth > limit {
				return false
			}
		case '}', ']':
			depth--
		}
	}
	return true
}

// SplitTop splits a run of JSON values joined by commas at the top level
// ("{…},{…}") into the values.
func SplitTop(b []byte) [][]byte {
	var items [][]byte
	depth, start := 0, 0
	EachStructural(b, func(i int, c byte) {
		switch c {
		case '{', '[':
			depth++
		case '}', ']':
			depth--
		case ',':
			if depth == 0 {
				items = append(items, b[start:i])
				start = i + 1
			}
		}
	})
	if start < len(b) {
		items = append(items, b[start:])
	}
	return items
}

const hexDigits = "0123456789abcdef"

// AppendString appends s as a JSON string; invalid UTF-8 becomes U+FFFD,
// so that what it writes is always valid UTF-8.
func AppendString(dst []byte, s string) []byte {
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			dst = append(dst, s[start:i]...)
			switch c {
			case '"', '\\':
				dst = append(dst, '\\', c)
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
			i++
			start = i
			continue
		}
		i += size
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}
