package batch

import (
	"errors"
	"fmt"
	"net/http/httptest"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"
)

// condStatuses are the final statuses a condition is evaluated under in
// the tables: each column of a case's want is one of them.
var condStatuses = []map[string]int{
	{"a": 200, "b": 200, "c": 200, "lookup": 404, "x.y~z-_": 201},
	{"a": 404, "b": 200, "c": 500, "lookup": 200, "x.y~z-_": 500},
	{"a": 424, "b": 500, "c": 302, "lookup": 424, "x.y~z-_": 424}, // a skipped
	{"a": 399, "b": 400, "c": 599, "lookup": 500, "x.y~z-_": 399},
}

// evalUnder binds the condition's ids to indexes and evaluates it under
// each of condStatuses.
func evalUnder(t *testing.T, c *condition) []bool {
	t.Helper()
	for k := range c.ids {
		c.ops[k] = k
	}
	var got []bool
	for _, m := range condStatuses {
		got = append(got, c.eval(func(op int) int {
			s, ok := m[c.ids[op]]
			if !ok {
				t.Fatalf("no status for %q", c.ids[op])
			}
			return s
		}))
	}
	return got
}

func TestConditionEval(t *testing.T) {
	const T, F = true, false
	cases := []struct {
		odata bool
		expr  string
		ids   []string
		want  []bool
	}{
		{false, "succeeded(a)", []string{"a"}, []bool{T, F, F, T}},
		{false, "failed(a)", []string{"a"}, []bool{F, T, T, F}},
		{false, "status(a) == 404", []string{"a"}, []bool{F, T, F, F}},
		{false, "status(a)!=404", []string{"a"}, []bool{T, F, T, T}},
		{false, "status(a) < 400", []string{"a"}, []bool{T, F, F, T}},
		{false, "status(a) <= 399", []string{"a"}, []bool{T, F, F, T}},
		{false, "status(a) > 399", []string{"a"}, []bool{F, T, T, F}},
		{false, "status(a)>=424", []string{"a"}, []bool{F, F, T, F}},
		{false, "status(lookup) == 404", []string{"lookup"}, []bool{T, F, F, F}},
		{false, "succeeded(a) && succeeded(b)", []string{"a", "b"}, []bool{T, F, F, F}},
		{false, "succeeded(a) || failed(c)", []string{"a", "c"}, []bool{T, T, F, T}},
		{false, "!succeeded(a)", []string{"a"}, []bool{F, T, T, F}},
		{false, "!!succeeded(a)", []string{"a"}, []bool{T, F, F, T}},
		{false, "!!!succeeded(a)", []string{"a"}, []bool{F, T, T, F}},
		// && binds tighter than ||, ! tighter than both.
		{false, "succeeded(a) || succeeded(b) && failed(c)", []string{"a", "b", "c"}, []bool{T, T, F, T}},
		{false, "(succeeded(a) || succeeded(b)) && failed(c)", []string{"a", "b", "c"}, []bool{F, T, F, T}},
		{false, "failed(c) && succeeded(b) || succeeded(a)", []string{"c", "b", "a"}, []bool{T, T, F, T}},
		{false, "!succeeded(a) && succeeded(b)", []string{"a", "b"}, []bool{F, T, F, F}},
		{false, "!(succeeded(a) && succeeded(b))", []string{"a", "b"}, []bool{F, T, T, T}},
		{false, "!status(a) == 404", []string{"a"}, []bool{T, F, T, T}},
		{false, "status(a) == 200 && status(b) == 200 || status(c) == 302", []string{"a", "b", "c"}, []bool{T, F, T, F}},
		{false, "succeeded(a) && succeeded(b) && succeeded(c)", []string{"a", "b", "c"}, []bool{T, F, F, F}},
		{false, "failed(a) && failed(a) || succeeded(a)", []string{"a"}, []bool{T, T, T, T}},
		{false, " \t( status ( a )\n>= 500\r|| status(b) == 200 ) ", []string{"a", "b"}, []bool{T, T, F, F}},
		{false, "succeeded(b) || failed(a) && status(b) == 200 || succeeded(c)", []string{"b", "a", "c"}, []bool{T, T, T, F}},
		{false, "((((succeeded(a)))))", []string{"a"}, []bool{T, F, F, T}},

		{true, "$a/$succeeded", []string{"a"}, []bool{T, F, F, T}},
		{true, "not $a/$succeeded", []string{"a"}, []bool{F, T, T, F}},
		{true, "not($a/$succeeded)", []string{"a"}, []bool{F, T, T, F}},
		{true, "$a/$succeeded and $b/$succeeded", []string{"a", "b"}, []bool{T, F, F, F}},
		{true, "$a/$succeeded or $b/$succeeded and not $c/$succeeded", []string{"a", "b", "c"}, []bool{T, T, F, T}},
		{true, "NOT ($a/$succeeded Or $b/$succeeded)", []string{"a", "b"}, []bool{F, F, T, F}},
		{true, "%28$a/$succeeded%20or%09$b/$succeeded%29%20and%20$c/$succeeded", []string{"a", "b", "c"}, []bool{T, F, F, F}},
		{true, "($a/$succeeded)and($b/$succeeded)", []string{"a", "b"}, []bool{T, F, F, F}},
		{true, "$x.y~z-_/$succeeded and not $lookup/$succeeded", []string{"x.y~z-_", "lookup"}, []bool{T, F, F, T}},
	}
	for _, c := range cases {
		t.Run(c.expr, func(t *testing.T) {
			parse := parseCondition
			if c.odata {
				parse = parseODataCondition
			}
			cond, msg := parse(c.expr)
			if msg != "" {
				t.Fatalf("refused: %s", msg)
			}
			if !slices.Equal(cond.ids, c.ids) {
				t.Errorf("ids %q, want %q", cond.ids, c.ids)
			}
			if len(cond.ops) != len(cond.ids) || slices.ContainsFunc(cond.ops, func(op int) bool { return op != -1 }) {
				t.Errorf("ops before binding %v, want a -1 for each id", cond.ops)
			}
			if got := evalUnder(t, cond); !slices.Equal(got, c.want) {
				t.Errorf("eval %v, want %v", got, c.want)
			}
		})
	}
}

// The tests of a term, over every status and the batch layer's own.
func TestConditionTerms(t *testing.T) {
	ops := map[string]func(s, n int) bool{
		"==": func(s, n int) bool { return s == n }, "!=": func(s, n int) bool { return s != n },
		"<": func(s, n int) bool { return s < n }, "<=": func(s, n int) bool { return s <= n },
		">": func(s, n int) bool { return s > n }, ">=": func(s, n int) bool { return s >= n },
	}
	succ, _ := parseCondition("succeeded(x)")
	fail, _ := parseCondition("failed(x)")
	odata, _ := parseODataCondition("$x/$succeeded")
	for _, c := range []*condition{succ, fail, odata} {
		c.ops[0] = 0
	}
	for status := 100; status <= 599; status++ {
		statusOf := func(int) int { return status }
		if succ.eval(statusOf) != (status < 400) || fail.eval(statusOf) != (status >= 400) || odata.eval(statusOf) != (status < 400) {
			t.Fatalf("status %d: succeeded %v, failed %v, $succeeded %v", status, succ.eval(statusOf), fail.eval(statusOf), odata.eval(statusOf))
		}
	}
	skipped := func(int) int { return statusSkipped }
	if succ.eval(skipped) || !fail.eval(skipped) {
		t.Errorf("a skipped operation (424) must count as failed")
	}
	for op, want := range ops {
		for _, n := range []int{100, 404, 599} {
			c, msg := parseCondition("status(x) " + op + " " + strconv.Itoa(n))
			if msg != "" {
				t.Fatalf("status(x) %s %d: %s", op, n, msg)
			}
			c.ops[0] = 0
			for _, s := range []int{100, 200, 403, 404, 405, 424, 599} {
				if got := c.eval(func(int) int { return s }); got != want(s, n) {
					t.Errorf("status(x) %s %d with status %d: %v", op, n, s, got)
				}
			}
		}
	}
}

func TestConditionFaults(t *testing.T) {
	long := strings.Repeat("i", maxIDLength+1)
	cases := []struct {
		odata bool
		expr  string
		want  string
	}{
		{false, "", "if: empty condition"},
		{false, " \t\r\n", "if: empty condition"},
		{false, "(succeeded(a)", "if: expected ')' at 14 to close the '(' at 1"},
		{false, "((succeeded(a))", "if: expected ')' at 16 to close the '(' at 1"},
		{false, "succeeded(a))", "if: unexpected ')' at 13"},
		{false, "foo(a)", `if: unknown function "foo" at 1: expected succeeded(ID), failed(ID) or status(ID)`},
		{false, "Succeeded(a)", `if: unknown function "Succeeded" at 1: expected succeeded(ID), failed(ID) or status(ID)`},
		{false, "succeeded a", `if: expected '(' after succeeded at 11, found "a"`},
		{false, "succeeded", `if: expected '(' after succeeded at 10, found the end`},
		{false, "succeeded()", `if: expected an operation id at 11, found ")"`},
		{false, "succeeded(a.b)", `if: expected ')' at 12, found "."`},
		{false, "succeeded(a b)", `if: expected ')' at 13, found "b"`},
		{false, "succeeded(a", `if: expected ')' at 12, found the end`},
		{false, "succeeded(" + long + ")", "if: operation id at 11 is longer than 128 bytes"},
		{false, "status(a)", "if: expected ==, !=, <, <=, > or >= after status(a) at 10, found the end"},
		{false, "status(a) 404", `if: expected ==, !=, <, <=, > or >= after status(a) at 11, found "404"`},
		{false, "status(a) = 404", `if: expected ==, !=, <, <=, > or >= after status(a) at 11, found "="`},
		{false, "status(a) => 404", `if: expected ==, !=, <, <=, > or >= after status(a) at 11, found "="`},
		{false, "status(a) == ", "if: expected a status from 100 to 599 at 14, found the end"},
		{false, "status(a) == -1", `if: expected a status from 100 to 599 at 14, found "-1"`},
		{false, "status(a) == x", `if: expected a status from 100 to 599 at 14, found "x"`},
		{false, "status(a) == 4040", `if: status "4040" at 14 is not a 3-digit HTTP status from 100 to 599`},
		{false, "status(a) == 99", `if: status "99" at 14 is not a 3-digit HTTP status from 100 to 599`},
		{false, "status(a) == 600", `if: status "600" at 14 is not a 3-digit HTTP status from 100 to 599`},
		{false, "status(a) == 099", `if: status "099" at 14 is not a 3-digit HTTP status from 100 to 599`},
		{false, "status(a) == " + strings.Repeat("9", 300), `if: status "` + strings.Repeat("9", maxEcho) + `…" at 14 is not a 3-digit HTTP status from 100 to 599`},
		{false, "status(a) == 404.5", `if: expected &&, || or ')' at 17, found "."`},
		{false, "succeeded(a) == 200", `if: "==" at 14: only status(ID) is compared with a status`},
		{false, "succeeded(a) < 200", `if: "<" at 14: only status(ID) is compared with a status`},
		{false, "succeeded(a) & succeeded(b)", `if: expected &&, || or ')' at 14, found "&"`},
		{false, "succeeded(a) | succeeded(b)", `if: expected &&, || or ')' at 14, found "|"`},
		{false, "succeeded(a) and succeeded(b)", `if: expected &&, || or ')' at 14, found "and"`},
		{false, "succeeded(a) succeeded(b)", `if: expected &&, || or ')' at 14, found "succeeded(b)"`},
		{false, "succeeded(a) !", `if: expected &&, || or ')' at 14, found "!"`},
		{false, "succeeded(a) &&", "if: expected succeeded(ID), failed(ID), status(ID), '!' or '(' at 16, found the end"},
		{false, "&& succeeded(a)", `if: expected succeeded(ID), failed(ID), status(ID), '!' or '(' at 1, found "&&"`},
		{false, "()", `if: expected succeeded(ID), failed(ID), status(ID), '!' or '(' at 2, found ")"`},
		{false, "!", "if: expected succeeded(ID), failed(ID), status(ID), '!' or '(' at 2, found the end"},
		{false, "!= 404", `if: expected succeeded(ID), failed(ID), status(ID), '!' or '(' at 1, found "!="`},
		{false, "404 == status(a)", `if: expected succeeded(ID), failed(ID), status(ID), '!' or '(' at 1, found "4"`},
		{false, "$a/$succeeded", `if: expected succeeded(ID), failed(ID), status(ID), '!' or '(' at 1, found "$"`},
		// Garbage, control bytes and invalid UTF-8 are named, quoted.
		{false, "succeeded(a) \x00", `if: expected &&, || or ')' at 14, found "\x00"`},
		{false, "\xff", `if: expected succeeded(ID), failed(ID), status(ID), '!' or '(' at 1, found "\xff"`},
		{false, "é", `if: expected succeeded(ID), failed(ID), status(ID), '!' or '(' at 1, found "é"`},
		{false, "succeeded(a\xffb)", `if: expected ')' at 12, found "\xff"`},
		{false, "succeeded(\xc3)", `if: expected an operation id at 11, found "\xc3"`},
		// Escaped, an echo grows up to four times: it is cut to fit.
		{false, strings.Repeat("\x89", 300), `if: expected succeeded(ID), failed(ID), status(ID), '!' or '(' at 1, found "\x89"`},
		{true, "$0" + strings.Repeat("\x89", 126), `if: "$0` + strings.Repeat(`\x89`, 31) + `…" at 1: a request id is 1 to 128 letters, digits, '-', '.', '_' or '~'`},

		{true, "", "if: empty condition"},
		{true, "$a/$failed", `if: "$a/$failed" at 1: OData has no $failed; write not $a/$succeeded`},
		{true, "$a", `if: "$a" at 1 is the body of the answer to a; the if member takes only $a/$succeeded`},
		{true, "$a/Name eq 'x'", `if: "$a/Name" at 1: values of an answer are not supported; the if member takes only $a/$succeeded`},
		{true, "$a/$Succeeded", `if: "$a/$Succeeded" at 1: values of an answer are not supported; the if member takes only $a/$succeeded`},
		{true, "$a/$succeeded/x", `if: "$a/$succeeded/x" at 1: values of an answer are not supported; the if member takes only $a/$succeeded`},
		{true, "$a/$succeeded eq true", `if: operator "eq" at 15 is not supported: the if member takes $ID/$succeeded, not, and, or and parentheses`},
		{true, "$a/$succeeded NE false", `if: operator "NE" at 15 is not supported: the if member takes $ID/$succeeded, not, and, or and parentheses`},
		{true, "$a/$succeeded && $b/$succeeded", `if: expected and, or or ')' at 15, found "&&"`},
		{true, "$a/$succeeded $b/$succeeded", `if: expected and, or or ')' at 15, found "$b/$succeeded"`},
		{true, "$a/$succeededand $b/$succeeded", `if: "$a/$succeededand" at 1: values of an answer are not supported; the if member takes only $a/$succeeded`},
		{true, "succeeded(a)", `if: expected $ID/$succeeded, not or '(' at 1, found "succeeded"`},
		{true, "true", `if: expected $ID/$succeeded, not or '(' at 1, found "true"`},
		{true, "$/$succeeded", `if: "$/$succeeded" at 1: a request id is 1 to 128 letters, digits, '-', '.', '_' or '~'`},
		{true, "$a!/$succeeded", `if: "$a!/$succeeded" at 1: a request id is 1 to 128 letters, digits, '-', '.', '_' or '~'`},
		{true, "$" + long + "/$succeeded", "if: request id at 2 is longer than 128 bytes"},
		{true, "($a/$succeeded", "if: expected ')' at 15 to close the '(' at 1"},
		{true, "%28$a/$succeeded", "if: expected ')' at 17 to close the '(' at 1"},
		{true, "$a/$succeeded)", "if: unexpected ')' at 14"},
		{true, "$a/$succeeded and", "if: expected $ID/$succeeded, not or '(' at 18, found the end"},
		{true, "not", "if: expected $ID/$succeeded, not or '(' at 4, found the end"},
		{true, "$a/$succeeded or \xff", `if: expected $ID/$succeeded, not or '(' at 18, found "\xff"`},
	}
	for _, c := range cases {
		t.Run(c.expr, func(t *testing.T) {
			parse := parseCondition
			if c.odata {
				parse = parseODataCondition
			}
			cond, msg := parse(c.expr)
			if msg != c.want {
				t.Errorf("got  %s\nwant %s", msg, c.want)
			}
			if cond != nil {
				t.Errorf("refused, yet a condition came back: %s", cond)
			}
			if !utf8.ValidString(msg) || len(msg) > maxFaultMessage {
				t.Errorf("message is not valid UTF-8, or longer than %d bytes: %q", maxFaultMessage, msg)
			}
		})
	}
}

// What bounds a condition: its bytes, its terms, its ids; nesting and
// runs of "!" cost nothing more than their bytes.
func TestConditionBounds(t *testing.T) {
	terms := func(n int, term, or string) string {
		return strings.TrimSuffix(strings.Repeat(term+or, n), or)
	}
	pad := func(s string, n int) string { return s + strings.Repeat(" ", n-len(s)) }
	ok := []struct {
		odata bool
		expr  string
		want  []bool // under condStatuses
	}{
		{false, terms(16, "succeeded(a)", " || "), []bool{true, false, false, true}},
		{true, terms(16, "$a/$succeeded", " or "), []bool{true, false, false, true}},
		{false, pad("succeeded(a)", maxCondLength), []bool{true, false, false, true}},
		{false, strings.Repeat("(", 506) + "succeeded(a)" + strings.Repeat(")", 506), []bool{true, false, false, true}},
		{true, strings.Repeat("%28", 200) + "$a/$succeeded" + strings.Repeat(")", 200), []bool{true, false, false, true}},
		{false, strings.Repeat("!", 1011) + "succeeded(a)", []bool{false, true, true, false}},
		{false, strings.Repeat("!(", 301) + "failed(a)" + strings.Repeat(")", 301), []bool{true, false, false, true}},
		{false, "succeeded(" + strings.Repeat("i", maxIDLength) + ")", nil},
		{true, "$" + strings.Repeat("i", maxIDLength) + "/$succeeded", nil},
	}
	for _, c := range ok {
		parse := parseCondition
		if c.odata {
			parse = parseODataCondition
		}
		cond, msg := parse(c.expr)
		if msg != "" {
			t.Errorf("%.40q… (%d bytes) refused: %s", c.expr, len(c.expr), msg)
			continue
		}
		if len(cond.steps) > 2*maxCondTerms {
			t.Errorf("%.40q…: %d steps", c.expr, len(cond.steps))
		}
		if c.want == nil {
			continue
		}
		if got := evalUnder(t, cond); !slices.Equal(got, c.want) {
			t.Errorf("%.40q…: eval %v, want %v", c.expr, got, c.want)
		}
	}
	refused := []struct {
		odata bool
		expr  string
		want  string
	}{
		{false, terms(17, "succeeded(a)", " || "), "if: more than 16 terms"},
		{false, terms(17, "status(a)==200", "&&"), "if: more than 16 terms"},
		{true, terms(17, "$a/$succeeded", " or "), "if: more than 16 terms"},
		{false, pad("succeeded(a)", maxCondLength+1), "if: longer than 1024 bytes"},
		{true, pad("$a/$succeeded", maxCondLength+1), "if: longer than 1024 bytes"},
		{false, strings.Repeat("x", 1<<20), "if: longer than 1024 bytes"},
		{false, strings.Repeat("(", maxCondLength), "if: expected succeeded(ID), failed(ID), status(ID), '!' or '(' at 1025, found the end"},
		{false, strings.Repeat("!", maxCondLength), "if: expected succeeded(ID), failed(ID), status(ID), '!' or '(' at 1025, found the end"},
		{false, strings.Repeat("(", 500) + "succeeded(a)" + strings.Repeat(")", 499), "if: expected ')' at 1012 to close the '(' at 1"},
		{false, strings.Repeat(")", maxCondLength), `if: expected succeeded(ID), failed(ID), status(ID), '!' or '(' at 1, found ")"`},
		{true, strings.Repeat("not ", 256), "if: expected $ID/$succeeded, not or '(' at 1025, found the end"},
	}
	for _, c := range refused {
		parse := parseCondition
		if c.odata {
			parse = parseODataCondition
		}
		if cond, msg := parse(c.expr); msg != c.want || cond != nil {
			t.Errorf("%.40q… (%d bytes):\ngot  %s\nwant %s", c.expr, len(c.expr), msg, c.want)
		}
	}
}

func TestConditionString(t *testing.T) {
	cases := []struct {
		odata      bool
		expr, want string
	}{
		{false, " ( succeeded(a) ) ", "succeeded(a)"},
		{false, "succeeded(a)&&(succeeded(b)&&succeeded(c))", "succeeded(a) && (succeeded(b) && succeeded(c))"},
		{false, "(succeeded(a)&&succeeded(b))&&succeeded(c)", "succeeded(a) && succeeded(b) && succeeded(c)"},
		{false, "succeeded(a)||succeeded(b)&&succeeded(c)", "succeeded(a) || succeeded(b) && succeeded(c)"},
		{false, "(succeeded(a)||succeeded(b))&&!failed(c)", "(succeeded(a) || succeeded(b)) && !failed(c)"},
		{false, "succeeded(a)||(succeeded(b)||succeeded(c))", "succeeded(a) || (succeeded(b) || succeeded(c))"},
		{false, "!!!(status(a)>=500)", "!(status(a) >= 500)"},
		{false, "!!(status(a)>=500)", "status(a) >= 500"},
		{false, "!(!succeeded(a)||failed(b))", "!(!succeeded(a) || failed(b))"},
		{false, "status(lookup)==404&&status(x)<=299", "status(lookup) == 404 && status(x) <= 299"},
		{false, "succeeded(0)&&failed(12)", "succeeded(0) && failed(12)"}, // default ids
		{true, "$0/$succeeded AND NOT $1/$succeeded", "$0/$succeeded and not $1/$succeeded"},
		{true, "NOT($a/$succeeded) AND (($b/$succeeded))", "not $a/$succeeded and $b/$succeeded"},
		{true, "%28$a/$succeeded%20or%20$b/$succeeded%29%20and%20$c/$succeeded", "($a/$succeeded or $b/$succeeded) and $c/$succeeded"},
		{true, "not(not(not $a/$succeeded or $b/$succeeded))", "not $a/$succeeded or $b/$succeeded"},
	}
	for _, c := range cases {
		parse := parseCondition
		if c.odata {
			parse = parseODataCondition
		}
		cond, msg := parse(c.expr)
		if msg != "" {
			t.Errorf("%q refused: %s", c.expr, msg)
			continue
		}
		if got := cond.String(); got != c.want {
			t.Errorf("%q printed %q, want %q", c.expr, got, c.want)
		}
		again, msg := parse(cond.String())
		if msg != "" || !reflect.DeepEqual(again.steps, cond.steps) || !slices.Equal(again.ids, cond.ids) {
			t.Errorf("%q printed %q, which parses to %v %v (%s), not %v %v", c.expr, cond.String(), again.steps, again.ids, msg, cond.steps, cond.ids)
		}
	}
}

var fzCondSeeds = []string{
	"succeeded(a)", "failed(a)", "status(lookup) == 404", "!(succeeded(a) && status(b) >= 500) || failed(c)",
	"status(a)!=200&&status(a)<300", "((succeeded(a)))", "!!!succeeded(a)", "(succeeded(a)", "status(a) == 4040",
	"$a/$succeeded", "not ($1/$succeeded or $2/$succeeded) and $x.y/$succeeded", "%28$a/$succeeded%29%20and%20not%20$b/$succeeded",
	"$a/$failed", "$a/Name eq 'x'", "\xff", "succeeded(a\xff)", "", strings.Repeat("(", 600), strings.Repeat("!", 1024),
}

// FuzzParseCondition parses any string in both syntaxes: a refusal is one
// "if: " message; what parses stays in its bounds, evaluates under any
// statuses, prints to what parses to the same program, and negated, to
// the opposite answer.
func FuzzParseCondition(f *testing.F) {
	for _, s := range fzCondSeeds {
		f.Add(s)
	}
	statuses := []int{100, 200, 204, 302, 399, 400, 404, 412, 424, 500, 504, 599}
	f.Fuzz(func(t *testing.T, s string) {
		for _, odata := range []bool{false, true} {
			parse, valid := parseCondition, validID
			if odata {
				parse, valid = parseODataCondition, odataID
			}
			c, msg := parse(s)
			if msg != "" {
				if c != nil || !strings.HasPrefix(msg, "if: ") || !utf8.ValidString(msg) || len(msg) > maxFaultMessage {
					t.Fatalf("%q refused with %q, condition %v", s, msg, c)
				}
				continue
			}
			if c == nil || len(s) > maxCondLength || len(c.ids) == 0 || len(c.ids) > maxCondTerms || len(c.ops) != len(c.ids) {
				t.Fatalf("%q accepted as %+v", s, c)
			}
			terms := 0
			for _, st := range c.steps {
				if st.kind == stepTerm {
					terms++
				}
			}
			if terms > maxCondTerms || len(c.steps) >= 4*maxCondTerms {
				t.Fatalf("%q: %d terms, %d steps", s, terms, len(c.steps))
			}
			for k, id := range c.ids {
				if !valid(id) || slices.Index(c.ids, id) != k {
					t.Fatalf("%q: ids %q", s, c.ids)
				}
				c.ops[k] = k
			}
			// Printed, it may be a few bytes longer than written: the
			// bound is for what clients send.
			again, msg := compileCondition(c.String(), odata)
			if msg != "" || !reflect.DeepEqual(again.steps, c.steps) || !slices.Equal(again.ids, c.ids) || again.String() != c.String() {
				t.Fatalf("%q printed %q, which parses to %v (%s), not %v", s, c.String(), again, msg, c)
			}
			neg := "!("
			if odata {
				neg = "not ("
			}
			not, msg := compileCondition(neg+c.String()+")", odata)
			if msg != "" {
				t.Fatalf("%q printed %q, which does not parse negated: %s", s, c.String(), msg)
			}
			for seed := range statuses {
				statusOf := func(op int) int { return statuses[(op*7+seed)%len(statuses)] }
				got := c.eval(statusOf)
				for k := range again.ops {
					again.ops[k] = k
				}
				if again.eval(statusOf) != got {
					t.Fatalf("%q and its print %q answer differently", s, c.String())
				}
				for k := range not.ops {
					not.ops[k] = k
				}
				if not.eval(statusOf) == got {
					t.Fatalf("%q and its negation answer the same", s)
				}
			}
		}
	})
}

// The "if" of an operation is validated with every other fault before
// anything runs, and implies depends_on on what it names.
func TestConditionInBatch(t *testing.T) {
	lim := ptLimits(t, nil)
	b := ptParse(t, lim, `[{"id":"lookup","path":"/users?email=a%40x"},
		{"id":"create","method":"POST","path":"/users","body":{},"if":"status(lookup) == 404"},
		{"id":"update","method":"PATCH","path":"/users/{{lookup.body.id}}","body":{},"if":"succeeded(lookup) && !failed(create)"}]`)
	if c := b.ops[1].cond; c == nil || !slices.Equal(c.ops, []int{0}) || !slices.Equal(b.ops[1].deps, []int{0}) {
		t.Errorf("create: cond %+v, deps %v; want it bound to lookup, and depending on it", c, b.ops[1].deps)
	}
	if c := b.ops[2].cond; c == nil || !slices.Equal(c.ops, []int{0, 1}) || !slices.Equal(b.ops[2].deps, []int{0, 1}) {
		t.Errorf("update: cond %+v, deps %v; want lookup and create, each once", c, b.ops[2].deps)
	}
	if !b.ops[0].tested || !b.ops[1].tested || b.ops[2].tested {
		t.Errorf("tested: %v %v %v, want the operations a condition names", b.ops[0].tested, b.ops[1].tested, b.ops[2].tested)
	}
	many := strings.Repeat("succeeded(a) && ", 16) + "succeeded(a)"
	for _, c := range []struct {
		name, body string
		want       []ptFault
	}{
		{"unknown id", `[{"id":"a","path":"/a"},{"path":"/b","if":"succeeded(nope)"}]`,
			[]ptFault{{1, "1", `if names unknown operation "nope"`}}},
		{"itself", `[{"id":"a","path":"/a","if":"failed(a)"}]`,
			[]ptFault{{0, "a", "cannot test its own answer"}}},
		{"syntax", `[{"id":"a","path":"/a"},{"path":"/b","if":"succeeded(a) &&"}]`,
			[]ptFault{{1, "1", "if: "}}},
		{"too many terms", `[{"id":"a","path":"/a"},{"path":"/b","if":"` + many + `"}]`,
			[]ptFault{{1, "1", "if: more than 16 terms"}}},
		{"too long", `[{"id":"a","path":"/a"},{"path":"/b","if":"` + strings.Repeat(" ", 1025) + `succeeded(a)"}]`,
			[]ptFault{{1, "1", "if: longer than 1024 bytes"}}},
		{"not a string", `[{"id":"a","path":"/a"},{"path":"/b","if":true}]`,
			[]ptFault{{1, "1", "if must be a string, got true"}}},
		{"later, sequential", `[{"path":"/b","if":"succeeded(a)"},{"id":"a","path":"/a"}]`,
			[]ptFault{{0, "0", `depends on "a", which comes later`}}},
		{"in a rollback", `{"atomicity":"all_or_nothing","batch":[{"id":"a","path":"/a"},
			{"path":"/b","rollback":{"path":"/c","if":"succeeded(a)"}}]}`,
			[]ptFault{{1, "1", `field "if" has no place in a rollback`}}},
		{"bulk", `{"operation":{"path":"/a","if":"succeeded(x)"},"items":[{}]}`,
			[]ptFault{{-1, "", "cannot have an if"}}},
		{"with other faults", `[{"id":"a","path":"//x"},{"path":"/b","if":"status(a) = 404"}]`,
			[]ptFault{{0, "a", "origin-form"}, {1, "1", "if: "}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			ptMatchFaults(t, c.body, ptFaults(t, lim, c.body), c.want)
		})
	}
	// A cycle through a condition is a cycle.
	par := ptLimits(t, &Handler{Mode: modeParallel})
	body := `[{"id":"a","path":"/a","if":"succeeded(b)"},{"id":"b","path":"/b","depends_on":["a"]}]`
	ptMatchFaults(t, body, ptFaults(t, par, body), []ptFault{{0, "a", "dependency cycle"}})
}

// A JSON batch takes OData's "if"; what OData does not have is refused.
func TestConditionInJSONBatch(t *testing.T) {
	lim := ptLimits(t, nil)
	decode := func(body string) (*batch, error) {
		r := httptest.NewRequest("POST", "/v1.0/$batch", strings.NewReader(body))
		return jsonBatch.decode(r, []byte(body), lim)
	}
	b, err := decode(`{"requests":[{"id":"a","method":"GET","url":"/a"},
		{"id":"b","method":"POST","url":"/b","if":"not $a/$succeeded"}]}`)
	if err != nil || b.ops[1].cond == nil || b.ops[1].cond.String() != "not $a/$succeeded" || !slices.Equal(b.ops[1].deps, []int{0}) {
		t.Fatalf("OData if: %v %+v", err, b)
	}
	for _, bad := range []string{`"$a/$failed"`, `"succeeded(a)"`, `"$z/$succeeded"`} {
		_, err := decode(`{"requests":[{"id":"a","method":"GET","url":"/a"},{"id":"b","method":"GET","url":"/b","if":` + bad + `}]}`)
		var faults badBatchError
		if !errors.As(err, &faults) {
			t.Errorf("if %s: %v, want faults", bad, err)
		}
	}
}

// upsert is SPEC §14's upsert of one user by email: a lookup, then a
// create if it answered 404, or an update of what it found.
func upsert(email, name string) string {
	return `{"id":"lookup","path":"/users?email=` + email + `"},
		{"id":"create","method":"POST","path":"/users","body":{"name":"` + name + `","email":"` + email + `"},"if":"status(lookup) == 404"},
		{"id":"update","method":"PATCH","path":"/users/{{lookup.body.id}}","body":{"name":"` + name + `"},"if":"succeeded(lookup)"}`
}

// The upsert pattern against a user that exists and one that does not,
// in each mode and atomicity: one of create and update runs, the other is
// skipped 412 before its references are resolved, and nothing failed.
func TestUpsert(t *testing.T) {
	be := newBackend(t)
	be.API.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("POST", "/users", strings.NewReader(`{"name":"Ann","email":"ann@x.org"}`)))
	base := startCaddy(t, proxySite(be, ""))
	for k, opts := range []string{`"mode":"sequential"`, `"mode":"parallel"`, `"atomicity":"all_or_nothing"`, `"atomicity":"stop_on_error"`} {
		for _, c := range []struct {
			email, name string
			create, upd int64
			// The lookup of a user not there fails, as it answers 404:
			// counted so, though it stops no atomic batch.
			failed int64
			status string
		}{
			{"ann@x.org", "Anne", 412, 200, 0, "completed"},
			{fmt.Sprintf("new%d@x.org", k), "Neo", 201, 412, 1, "completed_with_errors"},
		} {
			_, _, body := send(t, "POST", base+"/batch", `{`+opts+`,"batch":[`+upsert(c.email, c.name)+`]}`)
			res := mustJSON(t, body)
			if res.Get("results.1.status").Int() != c.create || res.Get("results.2.status").Int() != c.upd ||
				res.Get("status").String() != c.status || res.Get("skipped").Int() != 1 || res.Get("failed").Int() != c.failed {
				t.Errorf("%s, %s: %s", opts, c.email, body)
			}
			skipped := res.Get("results.1")
			if c.upd == 412 {
				skipped = res.Get("results.2")
			}
			if skipped.Get("error").String() != "condition false" {
				t.Errorf("%s, %s: the skipped one says %s", opts, c.email, skipped.Raw)
			}
			_, _, found := send(t, "GET", base+"/users?email="+c.email, "")
			if got := mustJSON(t, found).Get("name").String(); got != c.name {
				t.Errorf("%s: after the upsert the user is %s", c.email, found)
			}
		}
	}
	if n := be.API.Len(); n != 5 {
		t.Errorf("%d users, want Ann and one new user per run", n)
	}
}

// A false "if" fails nothing: not its atomicity group, not an
// all_or_nothing or stop_on_error batch; a true one runs whatever the
// operation it tests answered, where depends_on alone would skip it.
func TestConditionAndAtomicity(t *testing.T) {
	be := newBackend(t)
	be.seed("Ann")
	base := startCaddy(t, proxySite(be, "")+`
	batch /v1.0/$batch {
		service_root /
	}`)
	for _, atomicity := range []string{"all_or_nothing", "stop_on_error"} {
		_, _, body := send(t, "POST", base+"/batch", `{"atomicity":"`+atomicity+`","batch":[
			{"id":"rename","method":"PATCH","path":"/users/1","body":{"name":"Bo-`+atomicity+`"},
			 "rollback":{"method":"PATCH","path":"/users/1","body":{"name":"Ann"}}},
			{"id":"undo","method":"PATCH","path":"/users/1","body":{"name":"Ann"},"if":"failed(rename)"},
			{"id":"after","path":"/health"}]}`)
		res := mustJSON(t, body)
		if res.Get("status").String() != "completed" || res.Get("results.1.status").Int() != 412 ||
			res.Get("results.2.status").Int() != 200 || res.Get("results.0.undone").Exists() {
			t.Errorf("%s: %s", atomicity, body)
		}
		if u, _ := be.API.Get(1); u.Name != "Bo-"+atomicity {
			t.Errorf("%s: user 1 is %q", atomicity, u.Name)
		}
	}
	// The failure a condition tests stops nothing either; what depends on
	// it without a condition is skipped.
	_, _, body := send(t, "POST", base+"/batch", `{"atomicity":"stop_on_error","batch":[
		{"id":"missing","path":"/users/999"},
		{"id":"fallback","path":"/health","if":"failed(missing)"},
		{"id":"plain","path":"/health","depends_on":["missing"]}]}`)
	res := mustJSON(t, body)
	if res.Get("results.1.status").Int() != 200 || res.Get("results.2.status").Int() != 424 {
		t.Errorf("a tested failure: %s", body)
	}
	// OData: a request skipped by its if inside an atomicity group leaves
	// the group whole.
	_, _, body = send(t, "POST", base+"/v1.0/$batch", `{"requests":[
		{"id":"h","method":"GET","url":"/health"},
		{"id":"x","method":"PATCH","url":"/users/1","body":{"name":"Cy"},"atomicityGroup":"g"},
		{"id":"y","method":"POST","url":"/users","body":{"name":"Dee"},"atomicityGroup":"g","if":"not $h/$succeeded"},
		{"id":"z","method":"GET","url":"/users/1","atomicityGroup":"g"}]}`)
	res = mustJSON(t, body)
	for i, want := range []int64{200, 200, 412, 200} {
		if got := res.Get(fmt.Sprintf("responses.%d.status", i)).Int(); got != want {
			t.Errorf("JSON batch, response %d: %d, want %d: %s", i, got, want, body)
		}
	}
	if got := res.Get("responses.2.body.error.message").String(); got != "condition false" {
		t.Errorf("the skipped request says %q", got)
	}
	if u, _ := be.API.Get(1); u.Name != "Cy" {
		t.Errorf("the group was undone: user 1 is %q", u.Name)
	}
}

// A job runs conditions as a batch does, and a false one leaves it
// completed; a streamed job, whose operations stand alone, refuses them.
func TestConditionInJob(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	id := submitJob(t, base+"/batch", `{"batch":[`+upsert("job@x.org", "Jo")+`]}`)
	p := waitJob(t, base+"/batch/"+id, alice, "completed")
	_, _, body := send(t, "GET", base+"/batch/"+id+"/results", "", alice)
	res := mustJSON(t, body)
	if p.Get("skipped").Int() != 1 || res.Get("results.1.status").Int() != 201 || res.Get("results.2.error").String() != "condition false" {
		t.Errorf("progress %s\nresults %s", p.Raw, body)
	}
	status, _, body := send(t, "POST", base+"/batch", "{\"id\":\"a\",\"path\":\"/health\"}\n{\"path\":\"/health\",\"if\":\"succeeded(a)\"}\n",
		alice, "Content-Type: application/x-ndjson")
	if status != 400 || !strings.Contains(body, "if needs the whole batch in memory") {
		t.Errorf("streamed job with an if: %d %s", status, body)
	}
}
