package batch

import (
	"fmt"
	"unicode/utf8"

	"github.com/tidwall/gjson"
)

// maxJSONDepth bounds nesting in a batch body, so that no recursive walk
// over it (ours or gjson's) can be driven into a stack blow-up.
const maxJSONDepth = 64

// checkJSON returns a message when body is not one valid JSON value in
// UTF-8 within maxJSONDepth, and "" when it is; then commas counts the
// commas that separate the elements of a top-level array.
func checkJSON(body []byte) (msg string, commas int) {
	if !utf8.Valid(body) {
		return "batch is not valid UTF-8", 0
	}
	depth, deepest := 0, 0
	eachStructural(body, func(_ int, c byte) {
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
	if deepest > maxJSONDepth {
		return fmt.Sprintf("batch nests JSON deeper than %d levels", maxJSONDepth), 0
	}
	if !gjson.ValidBytes(body) {
		return "batch is not valid JSON", 0
	}
	return "", commas
}

// eachStructural calls fn with each of the bytes {}[], of b that stand
// outside JSON strings, and their offsets. It never recurses.
func eachStructural(b []byte, fn func(i int, c byte)) {
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

// countElements counts the elements of a JSON array without decoding them.
func countElements(arr gjson.Result) int {
	n := 0
	arr.ForEach(func(_, _ gjson.Result) bool {
		n++
		return true
	})
	return n
}

// validJSON reports whether b is one JSON value in UTF-8 nested at most
// depth levels. The depth is checked first, without recursion, so that the
// recursive validator that follows is bounded by it.
func validJSON(b []byte, depth int) bool {
	return depthWithin(b, depth) && utf8.Valid(b) && gjson.ValidBytes(b)
}

// depthWithin reports whether the arrays and objects of b, outside its
// strings, nest at most limit levels. Unbalanced input is left to the
// validator: only the depth it would reach matters here.
func depthWithin(b []byte, limit int) bool {
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

const hexDigits = "0123456789abcdef"

// appendString appends s as a JSON string; invalid UTF-8 becomes U+FFFD.
func appendString(dst []byte, s string) []byte {
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
