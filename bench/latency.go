package main

import (
	"bytes"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// latencyProxy is a TCP proxy on loopback that delays every byte by a fixed
// one-way delay in each direction, so that a round trip through it costs
// the RTT of a real network. It is a delay line, not a stop-and-wait relay:
// each chunk read is stamped and written at stamp+delay while the next ones
// are already being read, so throughput is not one chunk per delay.
type latencyProxy struct {
	ln     net.Listener
	target string
	delay  time.Duration // one way

	accepted atomic.Int64 // connections accepted, to show how many each scenario opened
	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	closed   bool
	wg       sync.WaitGroup
}

const (
	// chunkSize is the most one read takes; queueLen the chunks a direction
	// holds in flight: at most 4 MiB a direction, and 32 KiB × 128 per
	// delay is far more than a scenario sends.
	chunkSize = 32 << 10
	queueLen  = 128
)

// startLatencyProxy listens on 127.0.0.1:0 and forwards each connection to
// target with rtt/2 of delay each way, until Close.
func startLatencyProxy(target string, rtt time.Duration) (*latencyProxy, error) {
	ln, err := listen()
	if err != nil {
		return nil, err
	}
	p := &latencyProxy{ln: ln, target: target, delay: rtt / 2, conns: map[net.Conn]struct{}{}}
	p.wg.Go(p.accept)
	return p, nil
}

// Addr is where clients connect.
func (p *latencyProxy) Addr() string { return p.ln.Addr().String() }

// accept serves connections until the listener is closed.
func (p *latencyProxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.accepted.Add(1)
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		if !p.track(c, up) {
			return
		}
		p.wg.Go(func() {
			var both sync.WaitGroup
			both.Go(func() { p.pipe(up, c) })
			both.Go(func() { p.pipe(c, up) })
			both.Wait()
			p.untrack(c, up)
			c.Close()
			up.Close()
		})
	}
}

// track registers a pair of connections so that Close can end them; it
// closes them and says false when the proxy is already closed.
func (p *latencyProxy) track(cs ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		for _, c := range cs {
			c.Close()
		}
		return false
	}
	for _, c := range cs {
		p.conns[c] = struct{}{}
	}
	return true
}

func (p *latencyProxy) untrack(cs ...net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range cs {
		delete(p.conns, c)
	}
}

// chunk is what one read took, and when it may be written.
type chunk struct {
	at time.Time
	b  []byte
}

// pipe copies src to dst, each chunk delayed by p.delay. The reader stamps
// chunks into a bounded queue (it blocks when the queue is full, which
// backs TCP flow control up to the sender); the writer sends each at its
// stamp, in order. At src's end it half-closes dst, so that a FIN reaches
// the other side as late as the data before it; on a write error it closes
// both, which ends the other direction too.
func (p *latencyProxy) pipe(dst, src net.Conn) {
	q := make(chan chunk, queueLen)
	go func() {
		defer close(q)
		buf := make([]byte, chunkSize)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				q <- chunk{time.Now().Add(p.delay), bytes.Clone(buf[:n])}
			}
			if err != nil {
				return
			}
		}
	}()
	broken := false
	for c := range q { // drained to the end, so that the reader never blocks forever
		if broken {
			continue
		}
		time.Sleep(time.Until(c.at))
		if _, err := dst.Write(c.b); err != nil {
			broken = true
			dst.Close()
			src.Close()
		}
	}
	if tc, ok := dst.(*net.TCPConn); ok && !broken {
		_ = tc.CloseWrite()
	}
}

// Close stops accepting, closes every connection and waits for all the
// proxy's goroutines to end.
func (p *latencyProxy) Close() {
	p.mu.Lock()
	p.closed = true
	p.ln.Close()
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}
