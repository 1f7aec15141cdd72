QTYPES = ()
