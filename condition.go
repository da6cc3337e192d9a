package batch

import (
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Conditions: the "if" of an operation (SPEC §14). The native syntax is
//
//	succeeded(ID)   failed(ID)   status(ID) == 404
//
// with == != < <= > >=, combined with !, && and || (in that order of
// precedence) and parentheses. A JSON batch writes OData 4.01's URL
// expression instead: $ID/$succeeded, combined with not, and, or and
// parentheses. Both compile to one postfix program.

// Bounds of a condition: its bytes, and its terms (succeeded(ID),
// failed(ID), status(ID) op n, or $ID/$succeeded).
const (
	maxCondLength = 1024
	maxCondTerms  = 16
)

// Steps of a condition's program, in postfix order.
const (
	stepTerm = iota
	stepNot
	stepAnd
	stepOr
)

// What a term tests of an operation's final status.
const (
	testSucceeded = iota // < 400
	testFailed           // >= 400
	testEq
	testNe
	testLt
	testLe
	testGt
	testGe
)

// condStep is one step of a condition's program: 6 bytes, as a job may
// hold many conditions of up to 62 steps (16 terms, 15 of && and ||, 31
// of !).
type condStep struct {
	kind uint8
	test uint8  // of a term
	id   uint8  // of a term: index in condition.ids
	n    uint16 // of a comparison: the status compared with
}

// condition is a parsed "if". The parser adds each of ids (the operations
// the condition names, in first-use order, each once) as a dependency,
// faults the ids no operation has, and sets ops[k] to the index of the
// operation ids[k] names; only then may the runner call eval.
type condition struct {
	ids   []string
	ops   []int // operation index of each id; -1 until set
	steps []condStep
	odata bool // written in OData's syntax, and printed in it
}

// eval tells whether the condition holds. statusOf gives the final status
// of an operation by its index: what it answered, or what the batch layer
// gave it (424 when it was not run). succeeded(X) holds for a status
// below 400, failed(X) for 400 and above (a skipped operation, 424,
// included); status(X) == n compares the status with n; OData's
// $X/$succeeded is succeeded(X).
//
// The program runs without recursion; its stack never holds more values
// than the condition has terms.
func (c *condition) eval(statusOf func(op int) int) bool {
	var st [maxCondTerms]bool
	n := 0
	for _, s := range c.steps {
		switch s.kind {
		case stepTerm:
			st[n] = s.holds(statusOf(c.ops[s.id]))
			n++
		case stepNot:
			st[n-1] = !st[n-1]
		case stepAnd:
			n--
			st[n-1] = st[n-1] && st[n]
		case stepOr:
			n--
			st[n-1] = st[n-1] || st[n]
		}
	}
	return st[0]
}

// holds tells whether a term's test holds for status.
func (s condStep) holds(status int) bool {
	n := int(s.n)
	switch s.test {
	case testSucceeded:
		return status < 400
	case testFailed:
		return status >= 400
	case testEq:
		return status == n
	case testNe:
		return status != n
	case testLt:
		return status < n
	case testLe:
		return status <= n
	case testGt:
		return status > n
	}
	return status >= n
}

// cmpOps are the comparisons of status(ID), by test.
var cmpOps = [...]string{testEq: "==", testNe: "!=", testLt: "<", testLe: "<=", testGt: ">", testGe: ">="}

// String returns the condition in its own syntax, with single spaces and
// only the parentheses it needs: parsed again, it makes the same program.
func (c *condition) String() string {
	type part struct {
		s    string
		prec int // 1 ||, 2 &&, 3 ! or a comparison, 4 any other term
	}
	st := make([]part, 0, maxCondTerms)
	paren := func(p part, wrap bool) string {
		if wrap {
			return "(" + p.s + ")"
		}
		return p.s
	}
	not, and, or := "!", " && ", " || "
	if c.odata {
		not, and, or = "not ", " and ", " or "
	}
	for _, s := range c.steps {
		switch s.kind {
		case stepTerm:
			prec := 4
			if s.test >= testEq {
				prec = 3 // "!(status(a) == 404)", not "!status(a) == 404"
			}
			st = append(st, part{c.termString(s), prec})
		case stepNot:
			// Its operand is no "!": two in a row are none.
			x := st[len(st)-1]
			st[len(st)-1] = part{not + paren(x, x.prec <= 3), 3}
		default:
			l, r := st[len(st)-2], st[len(st)-1]
			prec, op := 2, and
			if s.kind == stepOr {
				prec, op = 1, or
			}
			// Left-associative: an equal right operand keeps its parentheses.
			st = append(st[:len(st)-2], part{paren(l, l.prec < prec) + op + paren(r, r.prec <= prec), prec})
		}
	}
	return st[0].s
}

func (c *condition) termString(s condStep) string {
	id := c.ids[s.id]
	switch {
	case c.odata:
		return "$" + id + "/$succeeded"
	case s.test == testSucceeded:
		return "succeeded(" + id + ")"
	case s.test == testFailed:
		return "failed(" + id + ")"
	}
	return "status(" + id + ") " + cmpOps[s.test] + " " + strconv.Itoa(int(s.n))
}

// parseCondition parses a native "if". A fault is a message that names
// the byte position (from 1) or the token at fault.
func parseCondition(s string) (*condition, string) {
	if len(s) > maxCondLength {
		return nil, fmt.Sprintf("if: longer than %d bytes", maxCondLength)
	}
	return compileCondition(s, false)
}

// parseODataCondition parses the "if" of a JSON batch request: an OData
// 4.01 URL expression over $ID/$succeeded, with not, and, or (in any
// case) and parentheses, which may be percent-encoded, as may the white
// space (%20, %09). White space is needed only between two words. The
// other forms OData allows there, $ID and $ID/path (values of the
// answer's body) with comparisons and functions over them, are refused;
// OData has no $ID/$failed and no access to the status.
func parseODataCondition(s string) (*condition, string) {
	if len(s) > maxCondLength {
		return nil, fmt.Sprintf("if: longer than %d bytes", maxCondLength)
	}
	return compileCondition(s, true)
}

// Tokens of a condition.
const (
	tokEnd = iota
	tokOpen
	tokClose
	tokNot
	tokAnd
	tokOr
	tokTerm
	tokOther // anything else: a fault wherever it stands
)

type condToken struct {
	kind int
	pos  int    // byte offset
	text string // as written
	test int    // of a term
	id   string // of a term
	n    int    // of a comparison
}

// opPrec is the precedence of an operator token.
func opPrec(kind int) int {
	switch kind {
	case tokOr:
		return 1
	case tokAnd:
		return 2
	case tokNot:
		return 3
	}
	return 0 // '('
}

// compileCondition turns s into a postfix program by shunting-yard: one
// pass, no recursion, whatever the nesting. The operator stack is bounded
// by the length of s, the program by the number of terms. The length of s
// is the caller's to bound: String may print a condition a few bytes
// longer than it was written, and its print must compile again.
func compileCondition(s string, odata bool) (*condition, string) {
	lx := condLexer{s: s, odata: odata}
	c := &condition{odata: odata}
	// Operators and '(', by kind and position: a deep nesting costs 8
	// bytes a level.
	type pending struct{ kind, pos int32 }
	var stack []pending
	emit := func(kind int) {
		if kind == stepNot && len(c.steps) > 0 && c.steps[len(c.steps)-1].kind == stepNot {
			c.steps = c.steps[:len(c.steps)-1] // !!x is x
			return
		}
		c.steps = append(c.steps, condStep{kind: uint8(kind)})
	}
	terms := 0
	operand := true // what comes next is an operand, not an operator
	for {
		tok, msg := lx.next()
		if msg != "" {
			return nil, msg
		}
		if operand {
			switch tok.kind {
			case tokNot, tokOpen:
				stack = append(stack, pending{int32(tok.kind), int32(tok.pos)})
			case tokTerm:
				if terms++; terms > maxCondTerms {
					return nil, fmt.Sprintf("if: more than %d terms", maxCondTerms)
				}
				c.steps = append(c.steps, condStep{kind: stepTerm, test: uint8(tok.test), id: uint8(c.idIndex(tok.id)), n: uint16(tok.n)})
				operand = false
			default:
				return nil, lx.operandFault(tok)
			}
			continue
		}
		switch tok.kind {
		case tokAnd, tokOr:
			for len(stack) > 0 {
				top := stack[len(stack)-1]
				if top.kind == tokOpen || opPrec(int(top.kind)) < opPrec(tok.kind) {
					break
				}
				emit(stepOf(int(top.kind)))
				stack = stack[:len(stack)-1]
			}
			stack = append(stack, pending{int32(tok.kind), int32(tok.pos)})
			operand = true
		case tokClose:
			for len(stack) > 0 && stack[len(stack)-1].kind != tokOpen {
				emit(stepOf(int(stack[len(stack)-1].kind)))
				stack = stack[:len(stack)-1]
			}
			if len(stack) == 0 {
				return nil, fmt.Sprintf("if: unexpected ')' at %d", tok.pos+1)
			}
			stack = stack[:len(stack)-1]
		case tokEnd:
			for len(stack) > 0 {
				top := stack[len(stack)-1]
				if top.kind == tokOpen {
					return nil, fmt.Sprintf("if: expected ')' at %d to close the '(' at %d", tok.pos+1, top.pos+1)
				}
				emit(stepOf(int(top.kind)))
				stack = stack[:len(stack)-1]
			}
			c.ops = make([]int, len(c.ids))
			for k := range c.ops {
				c.ops[k] = -1
			}
			return c, ""
		default:
			return nil, lx.operatorFault(tok)
		}
	}
}

func stepOf(kind int) int {
	switch kind {
	case tokNot:
		return stepNot
	case tokAnd:
		return stepAnd
	}
	return stepOr
}

// idIndex returns the index of id in c.ids, adding it if new. There are
// at most maxCondTerms.
func (c *condition) idIndex(id string) int {
	for k, have := range c.ids {
		if have == id {
			return k
		}
	}
	c.ids = append(c.ids, id)
	return len(c.ids) - 1
}

// condLexer reads the tokens of a condition in either syntax.
type condLexer struct {
	s     string
	i     int
	odata bool
}

// found describes a token for a fault: quoted, cut short, or "the end".
func found(tok condToken) string {
	if tok.kind == tokEnd {
		return "the end"
	}
	return quoted(tok.text)
}

// quoted returns s quoted, cut to maxEcho bytes between the quotes:
// escaped, invalid UTF-8 grows fourfold, so s is cut as it is quoted.
func quoted(s string) string {
	b := []byte{'"'}
	for i := 0; i < len(s); {
		_, n := utf8.DecodeRuneInString(s[i:])
		q := strconv.Quote(s[i : i+n])
		if len(b)-1+len(q)-2 > maxEcho {
			b = append(b, "…"...)
			break
		}
		b = append(b, q[1:len(q)-1]...)
		i += n
	}
	return string(append(b, '"'))
}

// operandFault is the fault of tok where a condition was expected.
func (lx *condLexer) operandFault(tok condToken) string {
	switch {
	case tok.kind == tokEnd && strings.TrimLeft(lx.s, " \t\r\n") == "":
		return "if: empty condition"
	case lx.odata:
		return fmt.Sprintf("if: expected $ID/$succeeded, not or '(' at %d, found %s", tok.pos+1, found(tok))
	case tok.kind == tokOther && isLetter(tok.text[0]):
		return fmt.Sprintf("if: unknown function %s at %d: expected succeeded(ID), failed(ID) or status(ID)", found(tok), tok.pos+1)
	}
	return fmt.Sprintf("if: expected succeeded(ID), failed(ID), status(ID), '!' or '(' at %d, found %s", tok.pos+1, found(tok))
}

// operatorFault is the fault of tok where an operator was expected.
func (lx *condLexer) operatorFault(tok condToken) string {
	if lx.odata {
		return fmt.Sprintf("if: expected and, or or ')' at %d, found %s", tok.pos+1, found(tok))
	}
	if tok.kind == tokOther && strings.Contains("=!<>", tok.text[:1]) {
		return fmt.Sprintf("if: %s at %d: only status(ID) is compared with a status", found(tok), tok.pos+1)
	}
	return fmt.Sprintf("if: expected &&, || or ')' at %d, found %s", tok.pos+1, found(tok))
}

func isLetter(c byte) bool { return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

// other returns the token of what starts at i and is none of the
// syntax's: one rune, or one byte of invalid UTF-8.
func (lx *condLexer) other(i int) condToken {
	_, n := utf8.DecodeRuneInString(lx.s[i:])
	return condToken{kind: tokOther, pos: i, text: lx.s[i : i+n]}
}

func (lx *condLexer) next() (condToken, string) {
	if lx.odata {
		return lx.nextOData()
	}
	return lx.nextNative()
}

// skipSpace skips the native syntax's white space.
func (lx *condLexer) skipSpace() {
	for lx.i < len(lx.s) {
		switch lx.s[lx.i] {
		case ' ', '\t', '\r', '\n':
			lx.i++
		default:
			return
		}
	}
}

// peek returns the token at the lexer's position, for a fault, without
// moving: a word of id bytes, or one rune.
func (lx *condLexer) peek() condToken {
	i := lx.i
	if i == len(lx.s) {
		return condToken{kind: tokEnd, pos: i}
	}
	j := i
	for j < len(lx.s) && idByte(lx.s[j]) {
		j++
	}
	if j > i {
		return condToken{kind: tokOther, pos: i, text: lx.s[i:j]}
	}
	return lx.other(i)
}

// expect consumes the byte c, after white space, or returns a fault.
func (lx *condLexer) expect(c byte, after string) string {
	lx.skipSpace()
	if lx.i < len(lx.s) && lx.s[lx.i] == c {
		lx.i++
		return ""
	}
	return fmt.Sprintf("if: expected '%c'%s at %d, found %s", c, after, lx.i+1, found(lx.peek()))
}

func (lx *condLexer) nextNative() (condToken, string) {
	lx.skipSpace()
	s, i := lx.s, lx.i
	if i == len(s) {
		return condToken{kind: tokEnd, pos: i}, ""
	}
	two := func(kind int) (condToken, string) {
		lx.i += 2
		return condToken{kind: kind, pos: i, text: s[i : i+2]}, ""
	}
	switch c := s[i]; {
	case c == '(':
		lx.i++
		return condToken{kind: tokOpen, pos: i, text: "("}, ""
	case c == ')':
		lx.i++
		return condToken{kind: tokClose, pos: i, text: ")"}, ""
	case strings.HasPrefix(s[i:], "&&"):
		return two(tokAnd)
	case strings.HasPrefix(s[i:], "||"):
		return two(tokOr)
	case c == '!' || c == '=' || c == '<' || c == '>':
		if i+1 < len(s) && s[i+1] == '=' {
			return two(tokOther) // a comparison out of place
		}
		if c == '!' {
			lx.i++
			return condToken{kind: tokNot, pos: i, text: "!"}, ""
		}
		lx.i++
		return condToken{kind: tokOther, pos: i, text: s[i : i+1]}, ""
	case isLetter(c):
		j := i
		for j < len(s) && idByte(s[j]) {
			j++
		}
		test := -1
		switch name := s[i:j]; name {
		case "succeeded":
			test = testSucceeded
		case "failed":
			test = testFailed
		case "status":
			test = testEq // the comparison follows
		default:
			lx.i = j
			return condToken{kind: tokOther, pos: i, text: name}, ""
		}
		lx.i = j
		return lx.call(i, test)
	}
	tok := lx.other(i)
	lx.i += len(tok.text)
	return tok, ""
}

// call reads the rest of a term whose function name starts at start:
// "(ID)", and for status a comparison with a status.
func (lx *condLexer) call(start, test int) (condToken, string) {
	name := lx.s[start:lx.i]
	if msg := lx.expect('(', " after "+name); msg != "" {
		return condToken{}, msg
	}
	lx.skipSpace()
	i := lx.i
	for lx.i < len(lx.s) && idByte(lx.s[lx.i]) {
		if lx.i-i == maxIDLength {
			return condToken{}, fmt.Sprintf("if: operation id at %d is longer than %d bytes", i+1, maxIDLength)
		}
		lx.i++
	}
	if lx.i == i {
		return condToken{}, fmt.Sprintf("if: expected an operation id at %d, found %s", i+1, found(lx.peek()))
	}
	id := lx.s[i:lx.i]
	if msg := lx.expect(')', ""); msg != "" {
		return condToken{}, msg
	}
	tok := condToken{kind: tokTerm, pos: start, test: test, id: id}
	if name == "status" {
		lx.skipSpace()
		op := -1
		for k := testEq; k <= testGe; k++ {
			// "<=" before "<": the longer of two that match.
			if o := cmpOps[k]; strings.HasPrefix(lx.s[lx.i:], o) && (op < 0 || len(o) > len(cmpOps[op])) {
				op = k
			}
		}
		if op < 0 {
			return condToken{}, fmt.Sprintf("if: expected ==, !=, <, <=, > or >= after status(%s) at %d, found %s", id, lx.i+1, found(lx.peek()))
		}
		lx.i += len(cmpOps[op])
		lx.skipSpace()
		j := lx.i
		for lx.i < len(lx.s) && isDigit(lx.s[lx.i]) {
			lx.i++
		}
		digits := lx.s[j:lx.i]
		if digits == "" {
			return condToken{}, fmt.Sprintf("if: expected a status from 100 to 599 at %d, found %s", j+1, found(lx.peek()))
		}
		if len(digits) != 3 || digits[0] < '1' || digits[0] > '5' {
			return condToken{}, fmt.Sprintf("if: status %s at %d is not a 3-digit HTTP status from 100 to 599", quoted(digits), j+1)
		}
		tok.test = op
		tok.n, _ = strconv.Atoi(digits)
	}
	tok.text = lx.s[start:lx.i]
	return tok, ""
}

// OData's white space and parentheses, percent-encoded or not.
func (lx *condLexer) odataSpace(i int) int {
	s := lx.s
	switch {
	case i < len(s) && (s[i] == ' ' || s[i] == '\t'):
		return 1
	case strings.HasPrefix(s[i:], "%20") || strings.HasPrefix(s[i:], "%09"):
		return 3
	}
	return 0
}

func (lx *condLexer) odataParen(i int) (kind, n int) {
	s := lx.s
	switch {
	case i < len(s) && s[i] == '(':
		return tokOpen, 1
	case i < len(s) && s[i] == ')':
		return tokClose, 1
	case strings.HasPrefix(s[i:], "%28"):
		return tokOpen, 3
	case strings.HasPrefix(s[i:], "%29"):
		return tokClose, 3
	}
	return 0, 0
}

// odataOperators are the operators of OData's URL expressions that the
// if member does not take, lower-case.
var odataOperators = []string{"eq", "ne", "lt", "le", "gt", "ge", "has", "in", "add", "sub", "mul", "div", "divby", "mod"}

func (lx *condLexer) nextOData() (condToken, string) {
	for n := lx.odataSpace(lx.i); n > 0; n = lx.odataSpace(lx.i) {
		lx.i += n
	}
	s, i := lx.s, lx.i
	if i == len(s) {
		return condToken{kind: tokEnd, pos: i}, ""
	}
	if kind, n := lx.odataParen(i); n > 0 {
		lx.i += n
		return condToken{kind: kind, pos: i, text: s[i : i+n]}, ""
	}
	// A word runs to white space, a parenthesis or the end.
	j := i
	for j < len(s) && lx.odataSpace(j) == 0 {
		if _, n := lx.odataParen(j); n > 0 {
			break
		}
		j++
	}
	lx.i = j
	word := s[i:j]
	tok := condToken{kind: tokOther, pos: i, text: word}
	switch {
	case strings.EqualFold(word, "not"):
		tok.kind = tokNot
	case strings.EqualFold(word, "and"):
		tok.kind = tokAnd
	case strings.EqualFold(word, "or"):
		tok.kind = tokOr
	case word[0] == '$':
		return lx.odataTerm(tok)
	default:
		for _, op := range odataOperators {
			if strings.EqualFold(word, op) {
				return condToken{}, fmt.Sprintf("if: operator %s at %d is not supported: the if member takes $ID/$succeeded, not, and, or and parentheses", found(tok), i+1)
			}
		}
	}
	return tok, ""
}

// odataTerm reads $ID/$succeeded, and refuses the rest of what OData
// writes with $: a response body ($ID) or a value in it ($ID/path).
func (lx *condLexer) odataTerm(tok condToken) (condToken, string) {
	id, rest, slash := strings.Cut(tok.text[1:], "/")
	pos := tok.pos + 1
	switch {
	case len(id) > maxIDLength:
		return condToken{}, fmt.Sprintf("if: request id at %d is longer than %d bytes", pos+1, maxIDLength)
	case !odataID(id):
		return condToken{}, fmt.Sprintf("if: %s at %d: a request id is 1 to %d letters, digits, '-', '.', '_' or '~'", found(tok), pos, maxIDLength)
	case !slash:
		return condToken{}, fmt.Sprintf("if: %s at %d is the body of the answer to %s; the if member takes only $%s/$succeeded", found(tok), pos, id, id)
	case rest == "$failed":
		return condToken{}, fmt.Sprintf("if: %s at %d: OData has no $failed; write not $%s/$succeeded", found(tok), pos, id)
	case rest != "$succeeded":
		return condToken{}, fmt.Sprintf("if: %s at %d: values of an answer are not supported; the if member takes only $%s/$succeeded", found(tok), pos, id)
	}
	tok.kind, tok.test, tok.id = tokTerm, testSucceeded, id
	return tok, ""
}
